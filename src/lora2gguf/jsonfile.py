"""Reading the JSON files of a model folder (configs, index, tokenizer) strictly: one place for the
checks and the messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import FormatError, InputError


# big files read more than once in a run (a 27 MB tokenizer.json: doctor, then the vocabulary,
# often the same bytes in the base and the adapter folder), parsed once per content:
# SHA-256 of the bytes -> object; at most two, dropped with forget()
_KEPT: dict[bytes, dict[str, Any]] = {}
_KEEP_AT_MOST = 2


def read_json_object(path: Path, *, missing: str, hint: str = "", keep: bool = False) -> dict[str, Any]:
    """A JSON object from `path`, or InputError (`missing` says what the file is and what to do)
    or FormatError naming the file and the problem.

    With `keep`, the parsed object is kept (until `forget()`) and given again, unparsed, for any
    file with the same bytes (hashing 27 MB takes ~20 ms, parsing it ~300): callers must not
    modify it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; {missing}")
    raw = path.read_bytes()
    key = hashlib.sha256(raw).digest() if keep else None
    if key in _KEPT:
        return _KEPT[key]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}){'; ' + hint if hint else ''}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if key is not None:
        while len(_KEPT) >= _KEEP_AT_MOST:
            old = _KEPT.pop(next(iter(_KEPT)))
            for k in [k for k in _DERIVED if k[0] == id(old)]:
                del _DERIVED[k]
        _KEPT[key] = data
    return data


# (id of a kept object, what) -> what derived() made of it; dropped with the object
_DERIVED: dict[tuple[int, str], Any] = {}


def derived(obj: dict[str, Any], what: str, make):
    """``make()``, computed once per kept object (read with ``keep``, never modified) and name
    ``what``, and given again until forget(); for any other object computed at every call."""
    if not any(o is obj for o in _KEPT.values()):
        return make()
    key = (id(obj), what)
    if key not in _DERIVED:
        _DERIVED[key] = make()
    return _DERIVED[key]


def forget() -> None:
    """Drop the kept objects (their memory), and what derived() made of them."""
    _KEPT.clear()
    _DERIVED.clear()
