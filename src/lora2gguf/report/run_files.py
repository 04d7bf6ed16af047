"""How to run each GGUF: an Ollama Modelfile per file and the llama.cpp command lines.

The Modelfile's TEMPLATE (Ollama's Go-template syntax), SYSTEM and stop strings come from the
model's chat format (:meth:`lora2gguf.chat.ChatFormat.ollama`): a template family lora2gguf knows
gets a TEMPLATE that renders conversations as the model's own chat template does; an unknown one
gets none and a comment saying what Ollama will do instead. The stop strings are the token that
ends an assistant turn, what a runaway model would write next, and the GGUF's end-of-generation
tokens, less the ones that only end a message inside a reply.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..chat import ChatFormat, OllamaSpec, chat_format
from ..errors import OutputError


def _format(record: dict[str, Any]) -> ChatFormat:
    from ..arch import known

    tech = record.get("technical") or {}
    specials = {f"{role}_token": d["token"] for role, d in (tech.get("special_tokens") or {}).items()
                if isinstance(d, dict) and isinstance(d.get("token"), str)}
    return chat_format(known().get(record.get("architecture") or ""), name=tech.get("chat_format"),
                       template=tech.get("chat_template"), specials=specials, where="the GGUF's chat template")


def eog_tokens(record: dict[str, Any]) -> list[str]:
    """The text of the end-of-generation tokens the GGUF's metadata declares (EOS, EOT, EOM), as
    run.json records them. (run.json's ``eog_tokens`` also lists the configs' ids, which the GGUF
    does not carry; the chat format adds the stops it needs itself.)"""
    tech = record.get("technical") or {}
    specials = tech.get("special_tokens") or {}
    out = [specials[r]["token"] for r in ("eos", "eot", "eom")
           if isinstance(specials.get(r), dict) and isinstance(specials[r].get("token"), str)]
    if not out and tech.get("eos_token"):
        out.append(tech["eos_token"])
    return list(dict.fromkeys(out))


def ollama_spec(record: dict[str, Any]) -> OllamaSpec:
    return _format(record).ollama(eog_tokens(record))


def stop_tokens(record: dict[str, Any]) -> list[str]:
    """The stop strings for runtimes that stop on text (Ollama)."""
    return list(ollama_spec(record).stops)


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise OutputError(f"the Ollama {what} contains three double quotes, which a Modelfile cannot hold")
    return '"""' + text + '"""'


def lora_pairs(record: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(base GGUF as a Modelfile names it, adapter file, the pair's record) for each base GGUF
    run.json's ``lora`` section pairs the LoRA GGUF with: ``./NAME`` in the output folder, else the
    absolute path."""
    lo = record.get("lora")
    if not isinstance(lo, dict) or not lo.get("file"):
        return []
    return [(b["path"] or b["file"], lo["file"], b) for b in lo.get("pairs") or []]


def pair_modelfile_name(base: str, adapter: str) -> str:
    return f"{Path(adapter).stem}-on-{Path(base).stem}.Modelfile"


def _ref(path: str) -> str:
    return path if Path(path).is_absolute() else f"./{path}"


def modelfile_text(record: dict[str, Any], gguf_file: str, adapter: str | None = None) -> str:
    """The Modelfile of a model GGUF, or (``adapter``) of a base GGUF with a LoRA GGUF applied:
    ``FROM base`` and ``ADAPTER adapter`` (Ollama hands the adapter to llama.cpp's --lora)."""
    spec = ollama_spec(record)
    mf = pair_modelfile_name(gguf_file, adapter) if adapter else Path(gguf_file).stem + ".Modelfile"
    what = f"{Path(gguf_file).name} with the LoRA {adapter}" if adapter else gguf_file
    tag = Path(mf).stem.lower() if adapter else Path(gguf_file).stem.lower()
    lines = [f"# Ollama Modelfile for {what}, written by lora2gguf {record.get('lora2gguf_version', '')}.",
             f"# ollama create {tag} -f {mf}",
             f"FROM {_ref(gguf_file)}"]
    if adapter:
        lines.append(f"ADAPTER {_ref(adapter)}")
    lines += [f"# {c}" for c in spec.comments]
    if spec.template is not None:
        lines.append("TEMPLATE " + _quoted(spec.template, "template"))
    if spec.system is not None:
        lines.append("# The model's chat template writes this system message when a conversation has none.")
        lines.append("SYSTEM " + _quoted(spec.system, "system message"))
    for t in spec.stops:
        lines.append('PARAMETER stop "' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "\n".join(lines) + "\n"


def commands(record: dict[str, Any], gguf_file: str, out_dir: str | None = None,
             lora: str | None = None) -> dict[str, str]:
    """llama.cpp command lines for one file (``llama-server``, ``llama-cli``) and the Ollama one;
    ``lora``: a LoRA GGUF applied at load time (``--lora``)."""
    def where(f: str) -> str:
        return shlex.quote(str(Path(out_dir) / f) if out_dir and not Path(f).is_absolute() else f)

    ctx = min(int((record.get("technical") or {}).get("context_length") or 8192), 8192)
    q = where(gguf_file) + (f" --lora {where(lora)}" if lora else "")
    mf = pair_modelfile_name(gguf_file, lora) if lora else Path(gguf_file).stem + ".Modelfile"
    stem = Path(mf).stem
    return {
        "llama-server": f"llama-server -m {q} --jinja -c {ctx} --host 127.0.0.1 --port 8080",
        "llama-cli": f"llama-cli -m {q} --jinja -c {ctx} -cnv",
        "ollama": f"ollama create {stem.lower()} -f {shlex.quote(str(Path(out_dir or '.') / mf))}"
                  f" && ollama run {stem.lower()}",
    }


def write_modelfiles(out_dir: Path, record: dict[str, Any]) -> list[Path]:
    """A Modelfile per model GGUF and per base GGUF + LoRA GGUF pair (a LoRA GGUF, or a base GGUF
    written to pair with it, is not the fine-tune on its own)."""
    todo = [(Path(o["file"]).stem + ".Modelfile", o["file"], None) for o in record.get("outputs", [])
            if not o.get("role")]
    todo += [(pair_modelfile_name(base, adapter), base, adapter) for base, adapter, _ in lora_pairs(record)]
    written = []
    for name, gguf_file, adapter in todo:
        p = Path(out_dir) / name
        try:
            p.write_text(modelfile_text(record, gguf_file, adapter), encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write {p}: {e}") from e
        written.append(p)
    return written
