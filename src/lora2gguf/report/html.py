"""report.html: one self-contained page (inline CSS, inline SVG plots; no JS, no network)."""

from __future__ import annotations

import re
from html import escape
from typing import Any

from .facts import human_bytes, num, pct, resolution
from .plots import bars_tokens_per_s, scatter_size_vs_kl

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f7fafc;color:#1a202c}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;margin:8px 0}h2{font-size:20px;border-bottom:2px solid #e2e8f0;padding-bottom:4px;margin-top:32px}
h3{font-size:16px}table{border-collapse:collapse;margin:8px 0 16px;font-size:13px;width:100%}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}th{background:#edf2f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}code,pre{font-family:SFMono-Regular,Consolas,monospace;font-size:12px}
pre{background:#1a202c;color:#e2e8f0;padding:10px;overflow-x:auto;border-radius:4px}
.verdict{padding:12px 16px;border-radius:6px;font-weight:bold;margin:12px 0}
.pass{background:#c6f6d5;color:#22543d}.fail{background:#fed7d7;color:#742a2a}.none{background:#edf2f7}
.ok{color:#22543d}.bad{color:#9b2c2c;font-weight:bold}.muted{color:#718096}.fact{color:#975a16}
.facts{background:#fefcbf;color:#744210;border:1px solid #f6e05e;font-weight:normal}
.facts h2{border:0;margin:0 0 6px;font-size:18px;padding:0}.facts ul{margin:6px 0 0;padding-left:20px}
.facts li{margin:3px 0}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.plots svg{box-sizing:border-box;border:1px solid #e2e8f0;width:calc(50% - 8px);min-width:420px;height:auto}
table.kv td:first-child{width:220px;background:#f7fafc;font-weight:600}
details{margin:8px 0}
"""


def _t(head: list[str] | None, rows: list[list[Any]], cls: str = "") -> str:
    h = "".join(f"<th>{escape(str(x))}</th>" for x in head or [])
    body = []
    for r in rows:
        cells = []
        for c in r:
            if isinstance(c, tuple):  # (html, css class) already escaped
                cells.append(f'<td class="{c[1]}">{c[0]}</td>')
            else:
                cells.append(f"<td>{escape(str(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    thead = f"<thead><tr>{h}</tr></thead>" if head else ""
    if head is None:
        cls = (cls + " kv").strip()
    return f'<table class="{cls}">{thead}<tbody>{"".join(body)}</tbody></table>'


def _mark(res: dict[str, Any] | None) -> tuple[str, str]:
    """A check's cell: pass; FAIL (against the reference, or an absolute check); "fails, as the
    fine-tune does" (the reference's own failure: "fine-tune fails it"), in the facts' colour."""
    if res is None:
        return ("n/a", "muted")
    outcome = res.get("outcome")
    if outcome is None:  # a record from before checks were judged against the reference
        s, cls = ("pass", "ok") if res["passed"] else ("FAIL", "bad")
    elif res["passed"] and outcome != "failed":
        s, cls = "pass", "ok"
    elif outcome == "failed":
        s, cls = "FAIL", "bad"
    else:
        s, cls = ("fine-tune fails it" if outcome == "reference" else "fails, as the fine-tune does"), "fact"
    if res.get("samples"):
        s += f" <span class='muted'>(samples {res['samples_passed']}/{res['samples']})</span>"
    why = f"<br><span class='bad'>{escape(res['reason'])}</span>" if outcome == "failed" and res.get("reason") else ""
    return (s + f"<br><span class='muted'>{escape(res['detail'])}</span>{why}", cls)


def _facts_html(f: dict[str, Any]) -> str:
    """The checks the reference fails: facts about the fine-tune, right after the verdict."""
    facts = f["fine_tune_facts"]
    if not facts:
        return ""
    head = f["fine_tune_facts_heading"]
    items = "".join(
        f"<li><b>{escape(x['title'] or x['prompt'])}</b> (<code>{escape(x['prompt'])}</code>, {escape(x['check'])}, "
        f"{'required' if x['required'] else 'optional'}): {escape(x['fact'])}; "
        f"<span class='muted'>{escape(x['consequence'])}.</span></li>" for x in facts)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(head["text"]))
    return (f'<div class="verdict facts" id="fine-tune-facts"><h2>{escape(head["title"])}</h2>{text}'
            f"<ul>{items}</ul></div>")


def _code(s: Any) -> tuple[str, str]:
    return (f"<code>{escape(str(s))}</code>", "")


def _n(x: Any) -> tuple[str, str]:
    return (escape(x if isinstance(x, str) else num(x)), "num")


def render_html(f: dict[str, Any]) -> str:
    v = f["verify"]
    H: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    f"<title>{escape(f['name'])}: GGUF conversion report</title>",
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<style>{CSS}</style></head><body><main>",
                    f"<h1>{escape(f['name'])}: GGUF conversion report</h1>",
                    f"<p class='muted'>Generated by lora2gguf {escape(str(f['version']))} from run.json "
                    f"(run created {escape(str(f['created']))}).</p>"]
    n_facts = len(f["fine_tune_facts"])
    also = (f" The reference fails {n_facts} check(s) itself: see \"{f['fine_tune_facts_heading']['title']}\" "
            "below." if n_facts else "")
    if f["passed"] is True:
        H.append('<div class="verdict pass" id="verdict">Verification passed: every GGUF behaves like the '
                 f"reference on every required check and is within its numeric gate.{escape(also)}</div>")
    elif f["passed"] is False:
        items = "".join(f"<li><code>{escape(x['file'])}</code>: {escape(x['check'])}"
                        + (f" on prompt <code>{escape(x['prompt'])}</code>" if x.get("prompt") else "")
                        + f": {escape(x['detail'])}" + (f" ({escape(x['why'])})" if x.get("why") else "")
                        + "</li>" for x in f["failures"])
        H.append(f'<div class="verdict fail" id="verdict">Verification FAILED: {len(f["failures"])} required '
                 f"check(s) failed.{escape(also)}<ul>{items}</ul></div>")
    else:
        H.append('<div class="verdict none" id="verdict">Verification has not run.</div>')
    H.append(_facts_html(f))

    tok, ad = f["tokenizer"], f["adapter"]
    H += ["<h2>Overview</h2>", _t(None, [
        ["Base model", _code(f["base_dir"])], ["Adapter", _code(f["adapter_dir"])],
        ["Architecture", f["architecture"]],
        ["Tokenizer", f"{tok.get('source', '?')} ({tok.get('reason', '')})"],
        ["LoRA", f"r={ad.get('r')}, alpha={ad.get('lora_alpha')}, rsLoRA={ad.get('use_rslora')}, "
                 f"{ad.get('pairs')} A/B pairs on {', '.join(ad.get('targets') or [])}" if ad else "n/a"]])]

    lo = f["lora"]
    if lo:
        H.append("<h2>LoRA GGUF</h2>")
        H.append(f"<p><code>{escape(lo['file'])}</code> ({escape(str(lo.get('type')))}): "
                 f"{len(lo.get('tensors') or {})} adapted base tensors, applied by llama.cpp at load time, "
                 f"adapter.lora.alpha = {escape(str(lo.get('alpha')))}. {escape(lo.get('scaling', ''))}.</p>")
        if lo.get("left_out"):
            H.append(_t(["Code", "What", "Why"], [[_code(x["code"]), x["what"], x["why"]]
                                                 for x in lo["left_out"]], "lora-left-out"))
        H.append(_t(["Base GGUF checked against", "Type", "Size", "sha256"],
                    [[_code(p.get("path") or p["file"]), str(p.get("type")), _n(p.get("bytes")),
                      _code(p.get("sha256"))] for p in lo.get("pairs") or []], "lora-pairs"))

    H.append("<h2>Findings and how they were resolved</h2>")
    if f["findings"]:
        H.append(_t(["Code", "Severity", "Finding", "What", "Fix", "Resolution"],
                    [[_code(x.get("code")), x.get("severity"), x.get("title"), x.get("what") or "", x.get("fix") or "",
                      resolution(x)]
                     for x in f["findings"]]))
    else:
        H.append("<p>doctor found nothing to report.</p>")

    H += ["<h2>Reproduce</h2>", f"<pre>{escape(chr(10).join(f['reproduce']))}</pre>"]

    H.append("<h2>Files</h2>")
    H.append(_t(["File", "Type", "Size", "Reduction", "Seconds", "From", "sha256"],
                [[_code(x["file"]), x["type"], _n(x["size"]),
                  _n("-" if x["reduction"] is None or x["reduction"] <= 0 else f"{x['reduction']:.0%}"),
                  _n(x["seconds"]), x["from"] or "merge", _code((x["sha256"] or "")[:16])] for x in f["files"]],
                "files"))
    H += _quantization_html(f)
    H.append("<h3>Tensor types per file</h3>")
    H.append(_t(["File", "Tensor types"],
                [[_code(x["file"]), ", ".join(f"{k}: {n}" for k, n in sorted(x["tensor_types"].items()))]
                 for x in f["files"]]))

    if v:
        ref, ev = v["reference"], v["eval"]
        H += ["<h2>Agreement with the reference</h2>",
              f"<p>Reference: <b>{escape(ref['label'])}</b> ({escape(ref['reason'])}).<br>Evaluation text: "
              f"{escape(ev['source'])}, {ev['n_tokens']} tokens as {escape(f['rendered_as'])}; {ev['n_scored']} "
              f"next-token predictions scored (from position {ev['first_scored']}). KL is KL(reference || file) in nats.</p>"]
        rows = []
        for x in f["runs"]:
            m, g = x["metrics"], x["gate"] or {}
            if m is None:
                rows.append([_code(x["file"]), x["type"], "reference", "", "", "", "", ""])
                continue
            rows.append([_code(x["file"]), x["type"], _n(m["kl_mean"]), _n(m["kl_p99"]), _n(m["kl_max"]),
                         _n(pct(m["top1"])), _n(f"{num(m['ppl'], 4)} (ref {num(m['ppl_ref'], 4)})"),
                         (("pass" if g.get("passed") else "FAIL") + f"<br><span class='muted'>{escape(g.get('detail', ''))}</span>",
                          "ok" if g.get("passed") else "bad")])
        H.append(_t(["File", "Type", "Mean KL", "KL p99", "Max KL", "Top-1", "Perplexity", "Gate"], rows, "agreement"))
        H.append(f"<p>{escape(f['tokenization_note'])}</p>")
        H.append(_t(["File", "Tokenizer"], [[_code(x["file"]), x["tokenization"]] for x in f["runs"]]))
        if f["side_by_side"]:
            H.append("<h3>Merged file or base + LoRA</h3><p>The same fine-tune two ways per type: merged into one "
                     "GGUF, or the base GGUF with the LoRA GGUF applied by llama.cpp at load time.</p>")
            H.append(_t(["Type", "Merged file", "Size", "Mean KL", "Gen. tok/s", "Base + LoRA", "Adapter size",
                         "Mean KL", "Gen. tok/s"],
                        [[r["type"], _code(r["merged"]["file"] or "-"), _n(r["merged"]["size"] or "-"),
                          _n(num(r["merged"]["kl"])), _n(num(r["merged"]["tg"], 4)), _code(r["lora"]["file"]),
                          _n(f"{r['lora']['size']} (+ base {r['base_size']})"), _n(num(r["lora"]["kl"])),
                          _n(num(r["lora"]["tg"], 4))] for r in f["side_by_side"]], "lora-vs-merged"))
        H.append('<div class="plots">')
        q = f["quantization"]
        H.append(scatter_size_vs_kl(f["quantized_points"], budget=q["budget"],
                                    title="Quantization candidates: size against mean KL" if q["auto"]
                                    else "Quantized files: size against mean KL"))
        H.append(bars_tokens_per_s(f["speed_rows"], threads=v.get("threads")))
        H.append("</div>")

        s = v["suite"]
        H += ["<h2>Test results</h2>",
              f"<p>Suite <b>{escape(s['name'])}</b> ({escape(s['source'])}): greedy answers, plus {s['samples']} "
              f"seeded sample(s) at temperature {escape(str(s['sampling'].get('temperature')))}; at most "
              f"{s['max_tokens']} tokens. A file fails a check held against the reference where the reference "
              "passes it and the file does not (greedy), or where it passes clearly fewer samples (at least 2 "
              "fewer and at most half the reference's rate); an absolute check, wherever the file's greedy "
              "answer fails it.</p>"]
        head = ["Prompt", "Check", "Required", "Against"] + f["models"]
        H.append(_t(head, [[c["prompt"], c["check"], "yes" if c["required"] else "no", c.get("against", "reference")]
                           + [_mark(c["results"].get(m)) for m in f["models"]] for c in v["checks"]], "checks"))
        H.append("<h3>Answers (greedy)</h3>")
        for p in s["prompts"]:
            rows = []
            for m in f["models"]:
                g = f["answers"][p["id"]].get(m)
                if g is None:
                    continue
                end = "token limit" if g["hit_limit"] else str(g["stop"])
                rows.append([m, (escape(g["analysis"] or "") or "<span class='muted'>none</span>", ""),
                             (escape(g["final"]) if g["final"] is not None else "<span class='bad'>no answer</span>", ""),
                             end])
            H.append(f"<p><b>{escape(p.get('title') or p['id'])}</b>: {escape(p['prompt'])}</p>")
            H.append(_t(["Model", "Reasoning", "Answer", "Ended by"], rows))

        H.append("<h2>Speed</h2>")
        H.append(f"<p>llama.cpp (llama-cpp-python) on this machine, {v.get('threads')} thread(s).</p>")
        H.append(_t(["File", "Type", "Prompt tokens/s", "Generation tokens/s", "Threads"],
                    [[_code(x["file"]), x["type"], _n(x["speed"]["pp_tokens_per_s"]),
                      _n(x["speed"]["tg_tokens_per_s"]), _n(str(x["speed"]["threads"]))]
                     for x in f["runs"] if x.get("speed")], "speed"))

    t = f["technical"]
    H += ["<h2>Technical details</h2>", _t(None, [
        ["Architecture", t.get("architecture")], ["Context length", _n(t.get("context_length"))],
        ["Vocabulary size", _n(t.get("vocab_size"))], ["Layers", _n(t.get("n_layers"))],
        ["Experts (used per token)", f"{t.get('n_experts')} ({t.get('n_experts_used')})"],
        ["Chat format", t.get("chat_format")], ["EOS", _code(f"{t.get('eos_token')} (id {t.get('eos_token_id')})")],
        ["End-of-generation tokens", _code(", ".join(f"{k} ({i})" for k, i in (t.get("eog_tokens") or {}).items()))],
        ["Special tokens", _code(", ".join(f"{k}: {d.get('token')} ({d.get('id')})"
                                           for k, d in (t.get("special_tokens") or {}).items()))]])]
    if t.get("chat_template"):
        H.append(f"<details><summary>Chat template</summary><pre>{escape(t['chat_template'])}</pre></details>")

    H.append("<h2>Stage times</h2>")
    H.append(_t(["Stage", "Seconds", "Details"],
                [[k, _n(d.get("seconds")), ", ".join(f"{a}={b}" for a, b in d.items() if a != "seconds")]
                 for k, d in f["stages"].items()]))

    H.append("<h2>Running the files</h2>")
    H.append(f"<p>Stop tokens for runtimes that stop on text: {escape(', '.join(f['stops']))}. Each file has an "
             "Ollama Modelfile next to it.</p>")
    for x in f["files"]:
        c = x["commands"]
        if c is None:  # a LoRA GGUF, or a base written for it: run as a pair below
            continue
        H.append(f"<h3><code>{escape(x['file'])}</code></h3><pre>{escape(chr(10).join([c['llama-server'], c['llama-cli'], c['ollama']]))}</pre>")
    for x in f["pairs"]:
        c = x["commands"]
        H.append(f"<h3><code>{escape(x['base'])}</code> with the LoRA <code>{escape(x['adapter'])}</code></h3>"
                 f"<pre>{escape(chr(10).join([c['llama-server'], c['llama-cli'], c['ollama']]))}</pre>")
    H.append("</main></body></html>")
    return "\n".join(H)


def _quantization_html(f: dict[str, Any]) -> list[str]:
    """The importance matrix and the ``--quant auto`` ladder (the plot is with the agreement)."""
    q = f["quantization"]
    H: list[str] = []
    m = q["matrix"]
    if m:
        H.append("<h2>Importance matrix</h2>")
        H.append(f"<p id='imatrix'><code>{escape(str(m['file']))}</code>: {escape(m['what'])}. {m['entries']} tensors "
                 "have data" + (f" ({escape(m['coverage'])})" if m["coverage"] else "")
                 + (f"; perplexity of the unquantized model on the data: {escape(num(m['perplexity'], 4))}"
                    if m["perplexity"] else "")
                 + (f"; {escape(num(m['seconds']))} s" if m["seconds"] else "") + "."
                 + (f" llama.cpp: {escape(m['tools'])}." if m["tools"] else "") + "</p>")
        if m["partial"]:
            H.append(_t(["Tensor", "Experts without data"], [[_code(k), v] for k, v in sorted(m["partial"].items())]))
    a = q["auto"]
    if a:
        chosen = a.get("chosen")
        H.append("<h2>Choosing the quantization (<code>--quant auto</code>)</h2>")
        H.append("<p>Every candidate was quantized by llama.cpp and verified against the reference; the budget is a "
                 f"mean KL of {a['budget']:g} nats. "
                 + (f"<b>Recommended: <code>{escape(chosen)}</code></b>, the smallest file within the budget that "
                    "fails no required check." if chosen else
                    "<b class='bad'>No candidate is within the budget and passes every required check</b>; all were kept.")
                 + "</p>")

        def kl(r):
            return _n(num(r["kl_mean"]) if r else "-")

        H.append(_t(["Type", "Size", "Mean KL with the matrix", "Mean KL without", "Top-1", "Suite checks passed", ""],
                    [[row["type"], _n(row["size"]), kl(row["with"]), kl(row["without"]), _n(pct(row["top1"])),
                      _n(row["checks"]), ("chosen", "ok") if row["chosen"] else ""] for row in q["ladder"]], "ladder"))
        H.append("<details><summary>Every candidate</summary>")
        H.append(_t(["File", "Type", "Matrix", "Size", "Mean KL", "Top-1", "Suite checks", "Verdict"],
                    [[_code(r["file"]), r["type"], "yes" if r["imatrix"] else "no", _n(human_bytes(r.get("bytes"))),
                      _n(num(r.get("kl_mean"))), _n(pct(r.get("top1"))), _n(f"{r['checks_passed']}/{r['checks']}"),
                      r["verdict"]] for r in a.get("candidates") or []]))
        H.append("</details>")
    return H

