"""Everything the report shows, derived from run.json only (one place for the arithmetic, so the
Markdown and HTML renderings cannot disagree)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from .run_files import commands, lora_pairs, pair_modelfile_name, stop_tokens

UNQUANTIZED = ("F32", "BF16", "F16")


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def facts(record: dict[str, Any], out_dir: str | Path | None = None) -> dict[str, Any]:
    v = record.get("verify") or {}
    outputs = record.get("outputs") or []
    vfiles = {f["file"]: f for f in v.get("files", [])}
    biggest_unq = max((o["bytes"] for o in outputs if str(o.get("type", "")).upper() in UNQUANTIZED),
                      default=None)
    files = []
    for o in outputs:
        vf = vfiles.get(o["file"], {})
        red = None
        if biggest_unq and o.get("bytes") is not None:
            red = 1.0 - o["bytes"] / biggest_unq
        role = o.get("role")
        files.append({
            "file": o["file"], "type": o.get("type"), "bytes": o.get("bytes"), "size": human_bytes(o.get("bytes")),
            "reduction": red, "sha256": o.get("sha256"), "seconds": o.get("seconds"),
            "from": o.get("from") or ({"lora": "adapter", "lora-base": "base"}.get(role) if role else None),
            "role": role, "tensor_types": o.get("tensor_types") or {}, "note": o.get("note"),
            "metrics": vf.get("metrics"), "gate": vf.get("gate"), "speed": vf.get("speed"),
            "stop_tokens": vf.get("stop_tokens"),
            "tokenization": _tokenization(vf.get("tokenization")),
            "commands": None if role else commands(record, o["file"], str(out_dir) if out_dir else None),
            "modelfile": None if role else Path(o["file"]).stem + ".Modelfile",
        })
    # what verify ran: each model file, and each base GGUF with the LoRA GGUF applied
    ran = []
    for vf in v.get("files", []):
        lo = vf.get("lora")
        ran.append({
            "file": vf["file"], "type": vf.get("type"), "bytes": vf.get("bytes"), "size": human_bytes(vf.get("bytes")),
            "metrics": vf.get("metrics"), "gate": vf.get("gate"), "speed": vf.get("speed"),
            "tokenization": _tokenization(vf.get("tokenization")), "lora": lo,
            "base_type": (lo or {}).get("base_type") or vf.get("type"),
        })
    pairs = []
    for base, adapter, b in lora_pairs(record):
        pairs.append({"base": base, "adapter": adapter, "type": b.get("type"), "base_size": human_bytes(b.get("bytes")),
                      "sha256": b.get("sha256"), "path": b.get("path"),
                      "commands": commands(record, base, str(out_dir) if out_dir else None, lora=adapter),
                      "modelfile": pair_modelfile_name(base, adapter)})
    side_by_side = _side_by_side(ran)
    cmd = record.get("command") or []
    reproduce = []
    if cmd:
        reproduce.append(" ".join(shlex.quote(str(c)) for c in cmd))
    if v and out_dir is not None:
        reproduce.append(f"lora2gguf verify {shlex.quote(str(out_dir))}"
                         + (f" --suite {shlex.quote(v['suite']['source'])}" if v.get("suite", {}).get("source") not in (None, "built-in") else "")
                         + (f" --text {shlex.quote(v['eval']['source'])}" if v.get("eval", {}).get("source") not in (None, "built-in", "given text") else ""))
    # behaviour table: one row per (prompt, check), a cell per model
    models = ["reference"] + [r["file"] for r in ran if r["file"] in (v.get("runs") or {})]
    answers: dict[str, dict[str, Any]] = {}
    for p in (v.get("suite") or {}).get("prompts", []):
        answers[p["id"]] = {}
        for m in models:
            runs = v.get("reference_runs") if m == "reference" else v["runs"].get(m, [])
            greedy = next((g for g in runs or [] if g["prompt"] == p["id"] and g["mode"] == "greedy"), None)
            answers[p["id"]][m] = greedy

    def own_name(file: str) -> str:  # a file's own part of its name: Q6_K-no-imatrix of NAME-Q6_K-no-imatrix.gguf
        stem, prefix = Path(file).stem, f"{record.get('name')}-"
        return stem[len(prefix):] if stem.startswith(prefix) and len(stem) > len(prefix) else stem

    run_types = [r["type"] for r in ran]

    def run_label(r: dict[str, Any]) -> str:
        if r["lora"]:
            return f"{r['base_type']} + LoRA"
        return r["type"] if r["type"] and run_types.count(r["type"]) == 1 else own_name(r["file"])

    quantized_points = [(run_label(r), _mb(r["bytes"] if not r["lora"] else (r["lora"].get("base_bytes") or 0)
                                          + (r["bytes"] or 0)), (r["metrics"] or {}).get("kl_mean"))
                        for r in ran if str(r["base_type"]).upper() not in UNQUANTIZED and r["metrics"]]
    speed_rows = [(run_label(r), r["speed"]["pp_tokens_per_s"], r["speed"]["tg_tokens_per_s"])
                  for r in ran if r.get("speed")]
    stages = record.get("stages") or {}
    chat = v.get("chat_format") or {}
    quant = quantization(record)
    return {
        "record": record, "name": record.get("name") or "model", "version": record.get("lora2gguf_version"),
        "created": record.get("created"), "base_dir": record.get("base_dir"), "adapter_dir": record.get("adapter_dir"),
        "architecture": record.get("architecture"), "tokenizer": record.get("tokenizer") or {},
        "findings": record.get("findings") or [], "files": files, "runs": ran, "reproduce": reproduce,
        "lora": record.get("lora") or None, "pairs": pairs, "side_by_side": side_by_side,
        "technical": record.get("technical") or {}, "stages": stages, "verify": v, "models": models,
        "answers": answers, "quantized_points": quant["points"] or quantized_points, "speed_rows": speed_rows,
        "quantization": quant,
        "stops": stop_tokens(record), "adapter": record.get("adapter") or {},
        "rendered_as": chat.get("rendered_as") or "a conversation in the model's chat format",
        "chat_label": chat.get("label") or (record.get("technical") or {}).get("chat_format"),
        "tokenization_note": ("Tokenizer check: every rendered prompt and the evaluation text are tokenized by llama.cpp "
                              "(each GGUF's own chat template and vocabulary) and by the fine-tune's tokenizer; the "
                              "ids must be the same." if chat.get("tokenizer_compared", True) else
                              "Tokenizer check not made: " + str(chat.get("not_compared_because"))),
        "passed": v.get("passed") if v else None, "failures": v.get("failures", []) if v else [],
        "fine_tune_facts": v.get("fine_tune_facts", []) if v else [],
        "fine_tune_facts_heading": (v.get("fine_tune_facts_heading") if v else None)
        or {"title": "Facts about the fine-tune", "text": ""},
    }


def quantization(record: dict[str, Any]) -> dict[str, Any]:
    """The importance matrix (what it was computed on, or which file was given) and the ``auto``
    ladder: one row per type with the mean KL with and without the matrix, and the plot's points
    (label, MB, mean KL, shape, chosen) with the budget."""
    im = record.get("imatrix")
    auto = record.get("quant_auto")
    matrix = None
    if im:
        data = im.get("data") or {}
        cov = im.get("coverage") or {}
        if im.get("computed", True):
            if data.get("source") == "built-in":
                origin = "the built-in calibration text and the verify suite's prompts in the model's chat format"
            else:
                origin = str(data.get("source"))
                if data.get("conversations"):
                    origin += f", {data['conversations']} conversations rendered with the model's chat format"
            what = (f"computed by llama.cpp's llama-imatrix on {data.get('label')} ({origin}; sha256 "
                    f"{str(data.get('sha256'))[:16]}): {im.get('tokens')} tokens, {im.get('chunks')} chunks of "
                    f"{im.get('chunk_size')}")
        else:
            what = f"given: {im.get('given')} (sha256 {str(im.get('given_sha256'))[:16]}), {im.get('chunks')} chunks"
        tools = (im.get("tools") or {}).get("version") or []
        matrix = {"file": im.get("file"), "what": what, "entries": im.get("entries"),
                  "coverage": f"{cov.get('with_data')} of {cov.get('weights')} block weights have data"
                              if cov else None,
                  "partial": im.get("partial") or {}, "perplexity": im.get("perplexity"),
                  "seconds": im.get("seconds"), "tools": "; ".join(tools) if tools else None}
    ladder, points = [], []
    if auto:
        by_type: dict[str, dict[str, Any]] = {}
        for r in auto.get("candidates") or []:
            row = by_type.setdefault(r["type"], {"type": r["type"], "with": None, "without": None})
            row["with" if r["imatrix"] else "without"] = r
            points.append((r["type"] + ("" if r["imatrix"] else " (no imatrix)"), _mb(r.get("bytes")),
                           r.get("kl_mean"), "circle" if r["imatrix"] else "triangle", bool(r.get("chosen"))))
        for row in by_type.values():
            main = row["with"] or row["without"]
            row.update({"size": human_bytes(main.get("bytes")), "bytes": main.get("bytes"),
                        "top1": main.get("top1"), "checks": f"{main.get('checks_passed')}/{main.get('checks')}",
                        "chosen": next((r["file"] for r in (row["with"], row["without"]) if r and r.get("chosen")),
                                       None)})
            ladder.append(row)
    return {"matrix": matrix, "auto": auto, "ladder": ladder, "points": points,
            "budget": (auto or {}).get("budget")}


def _side_by_side(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per base type, the merged file beside the base GGUF with the LoRA GGUF applied: what each
    costs on disk and in speed, and how close each is to the reference."""
    merged = {str(r["type"]).upper(): r for r in runs if not r["lora"]}
    rows = []
    for r in runs:
        if not r["lora"]:
            continue
        m = merged.get(str(r["base_type"]).upper())

        def cells(x):
            if x is None:
                return {"file": None, "size": None, "kl": None, "top1": None, "tg": None, "pp": None}
            met, sp = x["metrics"] or {}, x["speed"] or {}
            return {"file": x["file"], "size": x["size"], "kl": met.get("kl_mean"), "top1": met.get("top1"),
                    "tg": sp.get("tg_tokens_per_s"), "pp": sp.get("pp_tokens_per_s")}

        rows.append({"type": r["base_type"], "merged": cells(m), "lora": cells(r),
                     "base_size": human_bytes((r["lora"] or {}).get("base_bytes"))})
    return rows


def _tokenization(t: dict[str, Any] | None) -> str:
    if not t:
        return "n/a"
    if not t.get("checked"):
        return f"not compared ({t.get('reason')})"
    if t.get("same"):
        return f"same ids as the fine-tune's tokenizer ({t.get('texts')} texts)"
    return "DIFFERENT: " + "; ".join(d["detail"] for d in t.get("differences", []))


def resolution(finding: dict[str, Any]) -> str:
    """How a doctor finding was resolved, from its severity and whether the user accepted it."""
    sev = finding.get("severity")
    if finding.get("accepted"):
        return f"accepted by the user (--accept {finding.get('code')})"
    if sev == "blocker":
        return "blocked the build"
    if sev == "warning":
        return "handled by lora2gguf as the fix says"
    return "for information"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def num(x: float | None, digits: int = 3) -> str:
    """A figure for a table: integers as they are, whole numbers of 100..1e7 without decimals,
    very small or very large values in e-notation, the rest with ``digits`` significant digits."""
    if x is None:
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e7:
        return f"{x:.{digits - 1}e}"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"