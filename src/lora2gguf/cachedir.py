"""lora2gguf's cache folder outside the repository and the project (offline tokenizers, the demo's
trained model, which architectures llama.cpp knows), and the atomic write of a file in it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """lora2gguf's cache folder: ``$LORA2GGUF_CACHE`` or ``~/.cache/lora2gguf``."""
    env = os.environ.get("LORA2GGUF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora2gguf"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file beside it, renamed into place (removed
    if anything fails): a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
