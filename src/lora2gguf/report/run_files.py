"""How to run each GGUF: an Ollama Modelfile per file and the llama.cpp command lines.

The Ollama TEMPLATE for Harmony is written in Ollama's Go-template syntax. Stop tokens are the
architecture's end-of-generation tokens except ``<|end|>``: in Harmony ``<|end|>`` closes the
analysis message and the answer follows it, so stopping there would cut every reply down to its
reasoning (llama.cpp drops ``<|end|>`` from its end-of-generation set for the same reason).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..errors import OutputError

#: Ollama TEMPLATE for Harmony (GPT-OSS): system message as gpt-oss expects it, the Ollama system
#: prompt as developer instructions, prior turns (assistant thinking as the analysis channel),
#: then ``<|start|>assistant`` for the model to complete.
HARMONY_OLLAMA_TEMPLATE = """\
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
{{- else if eq $m.Role "assistant" }}
{{- if $m.Thinking }}<|start|>assistant<|channel|>analysis<|message|>{{ $m.Thinking }}<|end|>
{{- end }}<|start|>assistant<|channel|>final<|message|>{{ $m.Content }}<|end|>
{{- end }}
{{- end }}<|start|>assistant"""

# tokens that end a message but not the reply
_NOT_A_STOP = {"harmony": {"<|end|>"}}


def stop_tokens(record: dict[str, Any]) -> list[str]:
    """The stop strings for runtimes that stop on text (Ollama): the architecture's EOG tokens as
    run.json records them, less the ones that only end a message within the reply."""
    tech = record.get("technical") or {}
    eog = list((tech.get("eog_tokens") or {}).keys())
    if not eog and tech.get("eos_token"):
        eog = [tech["eos_token"]]
    skip = _NOT_A_STOP.get(tech.get("chat_format") or "", set())
    return [t for t in eog if t not in skip]


def modelfile_text(record: dict[str, Any], gguf_file: str) -> str:
    tech = record.get("technical") or {}
    lines = [f"# Ollama Modelfile for {gguf_file}, written by lora2gguf {record.get('lora2gguf_version', '')}.",
             f"# ollama create {Path(gguf_file).stem.lower()} -f {Path(gguf_file).stem}.Modelfile",
             f"FROM ./{gguf_file}"]
    if tech.get("chat_format") == "harmony":
        lines.append('TEMPLATE """' + HARMONY_OLLAMA_TEMPLATE + '"""')
        lines.append("# <|end|> closes the analysis message; the answer comes after it, so it is not a stop.")
    for t in stop_tokens(record):
        lines.append(f'PARAMETER stop "{t}"')
    return "\n".join(lines) + "\n"


def commands(record: dict[str, Any], gguf_file: str, out_dir: str | None = None) -> dict[str, str]:
    """llama.cpp command lines for one file (``llama-server``, ``llama-cli``) and the Ollama one."""
    path = str(Path(out_dir) / gguf_file) if out_dir else gguf_file
    ctx = min(int((record.get("technical") or {}).get("context_length") or 8192), 8192)
    q = shlex.quote(path)
    stem = Path(gguf_file).stem
    return {
        "llama-server": f"llama-server -m {q} --jinja -c {ctx} --host 127.0.0.1 --port 8080",
        "llama-cli": f"llama-cli -m {q} --jinja -c {ctx} -cnv",
        "ollama": f"ollama create {stem.lower()} -f {shlex.quote(str(Path(out_dir or '.') / (stem + '.Modelfile')))}"
                  f" && ollama run {stem.lower()}",
    }


def write_modelfiles(out_dir: Path, record: dict[str, Any]) -> list[Path]:
    written = []
    for o in record.get("outputs", []):
        p = Path(out_dir) / (Path(o["file"]).stem + ".Modelfile")
        try:
            p.write_text(modelfile_text(record, o["file"]), encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write {p}: {e}") from e
        written.append(p)
    return written
