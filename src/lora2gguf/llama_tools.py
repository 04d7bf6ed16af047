"""llama.cpp's own command-line tools: ``llama-imatrix`` (importance matrices) and
``llama-quantize`` (quantization with a matrix and per-tensor types).

Where they are, in this order:

1. the folder given by ``--llama-cpp DIR`` (the Python API's ``llama_cpp=``): a llama.cpp build
   of your own (CUDA, Metal, ...); ``DIR``, ``DIR/bin`` or ``DIR/build/bin``;
2. the folder in the environment variable :data:`ENV` (``LORA2GGUF_LLAMA_CPP``), the same way;
3. the ones ``scripts/setup.sh`` builds from the llama.cpp source of the llama-cpp-python wheel
   (portable flags, static) and copies next to this Python (``.venv/bin``);
4. ``PATH``.

Which build ran is recorded: the tool's own ``--version`` lines and, for setup's build, the
``llama-tools.json`` it writes beside the binaries (source and CMake flags).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import InputError, OutputError

#: the tools lora2gguf runs
IMATRIX = "llama-imatrix"
QUANTIZE = "llama-quantize"
TOOLS = (IMATRIX, QUANTIZE)
#: the environment variable naming a llama.cpp build folder
ENV = "LORA2GGUF_LLAMA_CPP"
#: what setup writes beside the binaries it builds
BUILD_INFO = "llama-tools.json"

_HOW = ("run scripts/setup.sh (it builds llama-imatrix and llama-quantize once from the same llama.cpp source as "
        "the llama-cpp-python wheel), or point --llama-cpp DIR (or LORA2GGUF_LLAMA_CPP) at a llama.cpp build of your "
        "own (cmake --build build --target llama-imatrix llama-quantize)")


@dataclass(frozen=True)
class LlamaTools:
    """A folder holding llama.cpp's tools, how it was found, and which build it is."""

    dir: Path
    found_by: str
    version: tuple[str, ...] = ()
    build: dict = field(default_factory=dict)

    def path(self, tool: str) -> Path:
        return self.dir / tool

    def record(self) -> dict:
        """What run.json says about the tools (and what a stage's key includes)."""
        return {"dir": str(self.dir), "found_by": self.found_by, "version": list(self.version),
                **({"build": self.build} if self.build else {})}

    def run(self, tool: str, args: Sequence[str], *, cwd: Path, on_output: Callable[[str], None] | None = None,
            what: str) -> list[str]:
        """Run ``tool args`` in ``cwd``. Its output goes to ``on_output`` as it comes (pieces of
        text, not always whole lines: llama-imatrix writes a chunk's perplexity without a newline)
        and its last lines are kept. A failure raises OutputError naming the tool, ``what`` it was
        doing and the tool's own last lines. Returns the last lines."""
        cmd = [str(self.path(tool)), *map(str, args)]
        tail: deque[str] = deque(maxlen=60)
        try:
            proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        except OSError as e:
            raise InputError(f"cannot run {cmd[0]} ({e}); {_HOW}") from None
        pending = ""
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                text = chunk.decode("utf-8", errors="replace")
                if on_output is not None:
                    on_output(text)
                *lines, pending = (pending + text).split("\n")
                tail.extend(x for x in lines if x.strip())
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if pending.strip():
            tail.append(pending)
        if rc != 0:
            raise OutputError(f"{tool} failed ({what}; exit code {rc}). Its last lines:\n"
                              + "\n".join("  " + t for t in _meaningful(tail)))
        return list(tail)


def _meaningful(lines: Sequence[str], n: int = 12) -> list[str]:
    """The tool's last lines, without the framing rows of its error boxes."""
    keep = [x for x in lines if x.strip(" =-\t")]
    return keep[-n:]


def _candidates(folder: Path) -> list[Path]:
    return [folder, folder / "bin", folder / "build" / "bin"]


def _holding(folder: Path, tools: Sequence[str]) -> Path | None:
    for c in _candidates(folder):
        if all(os.access(c / t, os.X_OK) for t in tools):
            return c
    return None


def find_tools(llama_cpp: str | os.PathLike[str] | None = None, tools: Sequence[str] = TOOLS) -> LlamaTools:
    """The folder holding ``tools`` (see the module's search order). An explicitly named folder
    that lacks one is an InputError naming it; none anywhere is an InputError saying how to get them."""
    for value, how in ((llama_cpp, "--llama-cpp"), (os.environ.get(ENV) or None, ENV)):
        if value is None:
            continue
        folder = Path(value).expanduser()
        found = _holding(folder, tools)
        if found is None:
            missing = [t for t in tools if not any(os.access(c / t, os.X_OK) for c in _candidates(folder))]
            raise InputError(f"{how} {folder}: no executable {', '.join(missing)} in it (nor in its bin/ or build/bin/); "
                             f"build them there (cmake --build build --target {' '.join(tools)}) or {_HOW}")
        return _describe(found.resolve(), how)
    venv = Path(sys.executable).parent
    if _holding(venv, tools) == venv:
        return _describe(venv, "lora2gguf's setup (next to its Python)")
    on_path = [shutil.which(t) for t in tools]
    if all(on_path) and len({Path(p).parent for p in on_path}) == 1:  # type: ignore[arg-type]
        return _describe(Path(on_path[0]).resolve().parent, "PATH")  # type: ignore[arg-type]
    raise InputError(f"llama.cpp's {' and '.join(tools)} not found; {_HOW}")


def _describe(folder: Path, how: str) -> LlamaTools:
    version, build = _version(str(folder), (folder / IMATRIX).stat().st_mtime_ns if (folder / IMATRIX).exists() else 0)
    return LlamaTools(folder, how, version, build)


@functools.lru_cache(maxsize=8)
def _version(folder: str, _mtime: int) -> tuple[tuple[str, ...], dict]:
    """``llama-imatrix --version`` (llama.cpp's build number, commit, compiler) and setup's
    llama-tools.json; cached per folder and binary mtime."""
    lines: tuple[str, ...] = ()
    exe = Path(folder) / IMATRIX
    if exe.exists():
        try:
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                                 errors="replace", stdin=subprocess.DEVNULL)
            lines = tuple(x.strip() for x in (out.stdout + out.stderr).splitlines()
                          if x.strip().startswith(("version:", "built with")))
        except (OSError, subprocess.TimeoutExpired):
            lines = ()
    build: dict = {}
    info = Path(folder) / BUILD_INFO
    if info.is_file():
        try:
            build = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            build = {}
    return lines, build
