"""The importance matrix: how much each input column of every weight matters, measured by
llama.cpp's ``llama-imatrix`` on the unquantized GGUF running the fine-tune's own data, so that
llama.cpp's quantizer spends its precision where the fine-tune's activations are.

Data (:func:`calibration`):

- ``--imatrix-data FILE``: JSONL of conversations, one ``{"messages": [{"role": ..., "content":
  ...}, ...]}`` per line (the format chat fine-tunes are trained on; ``reasoning_content`` or
  ``thinking`` kept as the reasoning), each rendered as a finished conversation with the GGUF's
  chat format (the family's format with the template the file carries); or ``{"text": ...}`` lines; or any other
  file, read as plain text;
- otherwise the built-in calibration: :data:`BUILTIN_LABEL`, a varied text written for lora2gguf
  (prose, dialogue, code, numbers, a few languages; MIT, like the package), then the verify
  suite's prompts rendered in the chat format.

The text is tokenized with the GGUF's own tokenizer (llama.cpp, vocabulary only) to choose the
chunk size and count the chunks before the run; llama-imatrix then runs in a scratch folder on a
file named after the data, so the matrix (and the quantized files' ``quantize.imatrix.dataset``)
records that name, never a path of this machine. The matrix's bytes depend only on the model,
the text, the chunk size and the llama.cpp build (the tests check that the thread count does not
change them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import FormatError, InputError, OutputError
from .gguf_out import partial_path

#: the name the built-in calibration data is recorded under
BUILTIN_LABEL = "lora2gguf-calibration-v1"
#: the largest chunk (tokens per llama-imatrix pass); a model trained on less gets its own context
MAX_CHUNK = 512
#: the smallest chunk llama-imatrix is run with (it ignores batches of fewer than 16 tokens)
MIN_CHUNK = 64

ProgressFn = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class Calibration:
    """What the matrix is computed on: ``text`` (what llama-imatrix reads), ``label`` (the name
    recorded in the matrix), ``source`` ("built-in" or the file's path), ``sha256`` (of the
    file's bytes; of the text for the built-in data), ``conversations`` (how many were rendered;
    0 for plain text)."""

    text: str
    label: str
    source: str
    sha256: str
    conversations: int = 0

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "sha256": self.sha256,
                "conversations": self.conversations, "chars": len(self.text)}


def builtin_text() -> str:
    from importlib.resources import files

    return files("lora2gguf").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration(data: str | os.PathLike[str] | None, fmt, prompts: Sequence[Any] = ()) -> Calibration:
    """The calibration text: ``data`` (a JSONL of conversations or a text file) rendered with the
    chat format ``fmt`` (:class:`lora2gguf.chat.ChatFormat`), or the built-in text followed by
    ``prompts`` (the verify suite's :class:`~lora2gguf.verify.suite.Prompt` objects) rendered in
    ``fmt``."""
    if data is None:
        parts = [builtin_text()]
        for p in prompts:
            parts.append(fmt.render_prompt(p.prompt, system=getattr(p, "system", None),
                                           developer=getattr(p, "developer", None),
                                           reasoning=getattr(p, "reasoning", None)).text)
        text = "\n".join(parts)
        return Calibration(text, BUILTIN_LABEL, "built-in", hashlib.sha256(text.encode()).hexdigest(), 0)
    path = Path(data)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"--imatrix-data {path}: cannot read it ({e.strerror or e})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--imatrix-data {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    sha = hashlib.sha256(raw).hexdigest()
    if _is_jsonl(path, content):
        texts = _render_jsonl(path, content, fmt)
        return Calibration("\n".join(texts), path.name, str(path), sha, len(texts))
    if not content.strip():
        raise InputError(f"--imatrix-data {path}: the file is empty")
    return Calibration(content, path.name, str(path), sha, 0)


def _first_line(content: str) -> str:
    return next((x for x in content.splitlines() if x.strip()), "")


def _is_jsonl(path: Path, content: str) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    try:
        obj = json.loads(_first_line(content))
    except ValueError:
        return False
    return isinstance(obj, dict) and ("messages" in obj or "text" in obj)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # multimodal content parts: their text
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise InputError(f"{where}: 'content' is not text (a string, or a list of {{'type': 'text', 'text': ...}} parts)")


def _render_jsonl(path: Path, content: str, fmt) -> list[str]:
    from .chat import Message

    texts = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--imatrix-data {path}, line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not JSON ({e}); each line is one conversation, "
                             '{"messages": [{"role": "user", "content": "..."}, ...]}') from None
        if not isinstance(obj, dict) or not ("messages" in obj or "text" in obj):
            raise InputError(f"{where}: expected an object with 'messages' (a conversation) or 'text'")
        if "text" in obj and "messages" not in obj:
            texts.append(_content(obj["text"], where))
            continue
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise InputError(f"{where}: message {i + 1} needs a 'role' and a 'content'")
            reasoning = m.get("reasoning_content", m.get("thinking", m.get("reasoning")))
            out.append(Message(m["role"], _content(m["content"], f"{where}, message {i + 1}"),
                               reasoning if isinstance(reasoning, str) and reasoning else None))
        try:
            texts.append(fmt.render_conversation(out).text)
        except InputError as e:
            raise InputError(f"{where}: the chat format cannot render this conversation: {e}") from None
    if not texts:
        raise InputError(f"--imatrix-data {path}: no conversation in it")
    return texts


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Plan:
    """How llama-imatrix will run: ``tokens`` the text tokenizes to (BOS included), the
    ``chunk`` size (tokens per pass) and the number of ``chunks``."""

    tokens: int
    chunk: int
    chunks: int


def plan(tokens: int, context_length: int | None, max_chunks: int | None = None, *, where: str) -> Plan:
    """Chunks of :data:`MAX_CHUNK` tokens (or the model's context length, if smaller); a text too
    short for two of them gets smaller chunks, down to :data:`MIN_CHUNK`."""
    chunk = min(MAX_CHUNK, int(context_length) if context_length else MAX_CHUNK)
    while chunk > MIN_CHUNK and tokens < 2 * chunk:
        chunk //= 2
    if chunk < MIN_CHUNK or tokens < 2 * chunk:
        raise InputError(f"{where}: the calibration text is {tokens} tokens; an importance matrix needs at least "
                         f"{2 * max(chunk, MIN_CHUNK)} (two chunks of {max(chunk, MIN_CHUNK)}). Give more data")
    n = tokens // chunk
    if max_chunks is not None:
        if max_chunks < 1:
            raise InputError(f"--imatrix-chunks {max_chunks}: give at least 1")
        n = min(n, max_chunks)
    return Plan(tokens, chunk, n)


_CHUNK_DONE = re.compile(r"\[(\d+)\](-?[0-9.]+|nan|inf),")
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def prepare(model: Path, family, data: str | os.PathLike[str] | None, prompts: Sequence[Any] = ()
            ) -> tuple[Calibration, int]:
    """The calibration text rendered with ``model``'s own chat format (the template and special
    tokens the GGUF carries, ``family``'s format), and the number of tokens llama-imatrix will
    make of it (the GGUF's tokenizer, special tokens parsed, BOS where the vocabulary adds one)."""
    from .verify import gguf_chat

    fmt, view = gguf_chat(Path(model), family)
    try:
        cal = calibration(data, fmt, prompts)
        return cal, len(view.llm.tokenize(cal.text.encode("utf-8"), add_bos=True, special=True))
    finally:
        view.llm.close()


def compute(tools, model: Path, data: Calibration, n_tokens: int, dst: Path, *, context_length: int | None,
            threads: int, max_chunks: int | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run llama-imatrix on ``model`` over ``data`` (``n_tokens`` long, :func:`prepare`) and write
    the matrix to ``dst`` (atomically). Returns what run.json records (without the file's SHA-256)."""
    p = plan(n_tokens, context_length, max_chunks, where=data.source)
    tmp = partial_path(dst)
    t0 = time.perf_counter()
    done = [0]
    seen = [""]

    def on_output(text: str) -> None:
        seen[0] = seen[0][-40:] + text  # a chunk's "[n]ppl," may arrive in two pieces
        for m in _CHUNK_DONE.finditer(seen[0]):
            done[0] = max(done[0], int(m.group(1)))
        if progress:
            progress("imatrix", min(done[0], p.chunks), p.chunks, f"{done[0]}/{p.chunks} chunks of {p.chunk} tokens")

    scratch = Path(tempfile.mkdtemp(prefix="lora2gguf-imatrix-"))
    try:
        (scratch / data.label).write_text(data.text, encoding="utf-8")
        if progress:
            progress("imatrix", 0, p.chunks, f"{p.chunks} chunks of {p.chunk} tokens")
        from .llama_tools import IMATRIX

        args = ["-m", str(Path(model).resolve()), "-f", data.label, "-o", str(tmp.resolve()),
                "--output-format", "gguf", "-c", str(p.chunk), "-b", str(p.chunk), "--chunks", str(p.chunks),
                "-t", str(threads), "--parse-special", "--output-frequency", str(p.chunks + 1)]
        try:
            tail = tools.run(IMATRIX, args, cwd=scratch, on_output=on_output, what=f"on {Path(model).name}")
        except OutputError:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not tmp.is_file():
        raise OutputError(f"llama-imatrix wrote no matrix for {model}")
    info = describe(tmp)
    os.replace(tmp, dst)
    ppl = next((m for m in map(_PPL.search, tail) if m), None)
    return {"computed": True, "data": data.record(), "tokens": p.tokens, "chunk_size": p.chunk,
            "chunks": info["chunks"], "threads": threads, "seconds": round(time.perf_counter() - t0, 3),
            "perplexity": float(ppl.group(1)) if ppl else None, **_public(info)}


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("entries", "datasets", "partial")}


def describe(path: Path) -> dict[str, Any]:
    """What an importance matrix file holds: its datasets, chunk count and size, the tensors it
    has data for (``sizes``: values per tensor) and, for MoE tensors, the experts that saw no
    token (``partial``)."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct.error ... on a file that is not GGUF
        raise FormatError(f"{path}: not an importance matrix GGUF ({type(e).__name__}: {e}). Give a file "
                          "llama-imatrix wrote (imatrix.gguf; a legacy imatrix.dat is converted with llama-imatrix "
                          "--in-file FILE -o FILE.gguf)") from None

    def field(name: str):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    if field("general.type") != "imatrix":
        raise FormatError(f"{path}: general.type is {field('general.type')!r}, not 'imatrix': this GGUF is not an "
                          "importance matrix (llama-imatrix writes one)")
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = int(np.prod([int(x) for x in t.shape]))
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    partial = {}
    for name, c in counts.items():
        zero = int((c == 0).sum())
        if zero:
            partial[name] = f"{zero} of {c.size} experts saw no token" if c.size > 1 else "no token"
    datasets = field("imatrix.datasets")
    return {"entries": len(sums), "sizes": sums, "chunks": field("imatrix.chunk_count"),
            "chunk_size": field("imatrix.chunk_size"),
            "datasets": list(datasets) if isinstance(datasets, list) else ([datasets] if datasets else []),
            "partial": partial}


def check_fits(info: dict[str, Any], shapes: dict[str, list[int]], where: str) -> dict[str, Any]:
    """Does a matrix fit the model whose GGUF tensor shapes (ggml order) are ``shapes``: every
    entry a tensor of the model with ne0 * ne2 values (llama.cpp's own check, which otherwise
    aborts the quantization)? Returns the coverage: the model's block weights with and without
    data."""
    for name, size in info["sizes"].items():
        shp = shapes.get(name)
        if shp is None:
            raise InputError(f"{where}: the importance matrix has data for {name}, which this model does not have: it "
                             "was computed for another model. Compute one for this model (leave out --imatrix, or "
                             "give --imatrix-data FILE)")
        want = int(shp[0]) * (int(shp[2]) if len(shp) > 2 else 1)
        if size != want:
            raise InputError(f"{where}: the importance matrix has {size} values for {name}, whose rows are {shp[0]} "
                             f"wide{f' in {shp[2]} experts' if len(shp) > 2 else ''} ({want} values): it was computed "
                             "for another model. Compute one for this model")
    weights = [n for n, s in shapes.items() if n.startswith("blk.") and n.endswith(".weight") and len(s) >= 2]
    covered = [n for n in weights if n in info["sizes"]]
    return {"weights": len(weights), "with_data": len(covered),
            "without_data": sorted(set(weights) - set(covered))[:20]}
