"""Reading the JSON files of a model folder (configs, index, tokenizer) strictly: one place for the
checks and the messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import FormatError, InputError


def read_json_object(path: Path, *, missing: str, hint: str = "") -> dict[str, Any]:
    """A JSON object from `path`, or InputError (`missing` says what the file is and what to do)
    or FormatError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}){'; ' + hint if hint else ''}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
