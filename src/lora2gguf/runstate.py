"""The run folder's lock and its manifest of stages, so that an interrupted run resumes.

- :class:`RunLock`: ``OUT_DIR/.lora2gguf.lock``, held with ``fcntl.flock`` while a run writes into
  the folder. A second run on the same folder gets an :class:`~lora2gguf.errors.OutputError` that
  names the folder and the other process' pid. The lock file is removed when the run ends.
- :class:`RunState`: ``OUT_DIR/.lora2gguf-state.json``. For each finished stage (``build``,
  ``quantize:Q8_0``, ``verify``...) it records a *key* (a digest of the stage's input
  fingerprints, its options and the lora2gguf version) and the SHA-256 and size of each output.
  A rerun skips a stage whose key is unchanged and whose outputs still have the recorded hashes;
  anything else (stale, partial, edited, missing) is redone. An entry is written only after the
  stage's outputs are renamed into place, so a killed run never leaves a stage marked finished.
- :func:`remove_partials`: ``*.partial`` leftovers of a killed run are deleted at the start.
- :func:`input_fingerprint`: content fingerprints of a base and an adapter folder, cheap enough
  to take on every run: small files (configs, tokenizer files, adapter weights up to
  :data:`FULL_HASH_LIMIT`) are hashed whole; large safetensors shards by size, mtime and the
  SHA-256 of their header (the tensor names, dtypes, shapes and offsets).

Pure standard library (plus :mod:`fcntl`); nothing here imports torch or llama.cpp.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import __version__
from .errors import OutputError
from .gguf_out import sha256_file

log = logging.getLogger(__name__)

LOCK_NAME = ".lora2gguf.lock"
STATE_NAME = ".lora2gguf-state.json"
SCHEMA = "lora2gguf.state/1"
PARTIAL_SUFFIX = ".partial"
#: files up to this size are hashed whole; larger ones by size + mtime + header hash
FULL_HASH_LIMIT = 1 << 30
#: the input files a fingerprint covers (top level of the base and adapter folders)
INPUT_SUFFIXES = (".json", ".jinja", ".safetensors", ".model", ".txt", ".tiktoken", ".py", ".bin", ".pt")


# --------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive, advisory lock on an output folder (``with RunLock(out_dir): ...``).

    The lock is an ``flock`` on ``OUT_DIR/.lora2gguf.lock``; the kernel drops it when the holder
    dies, so a killed run never leaves a stale lock behind (the file itself may remain and is
    reused). The file holds the holder's pid, host and start time, for the error message.
    """

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        for _ in range(20):  # retry if the file was removed between our open and our flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"{self.out_dir}: cannot create the lock file {LOCK_NAME} ({e.strerror}); "
                                  "is the folder writable?") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"{self.out_dir}: another lora2gguf run ({holder}) is writing to this folder. "
                        "Wait for it to finish, or choose another output folder (-o)."
                    ) from None
                # a filesystem without flock (some network mounts): run unlocked, but say so
                log.warning("%s: cannot lock the output folder (%s); running without a lock", self.out_dir, e.strerror)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "version": __version__}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self._fd = fd
            return self
        raise OutputError(f"{self.out_dir}: could not take the lock {LOCK_NAME} (it keeps being replaced)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "pid unknown"


def holder(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the folder's lock (the lock file's JSON), or None if nobody does."""
    import fcntl

    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                return {}
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- leftovers


def remove_partials(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete ``*.partial`` files in ``out_dir`` (what a killed run leaves). Call it while holding
    the folder's :class:`RunLock`. Returns the removed paths."""
    removed = []
    for p in sorted(Path(out_dir).glob("*" + PARTIAL_SUFFIX)):
        if p.is_file() or p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
            log.info("removed %s, left by an interrupted run", p)
    return removed


# --------------------------------------------------------------------------- fingerprints


def _header_sha256(path: Path, size: int) -> str:
    """SHA-256 of a safetensors file's 8-byte length and JSON header (or of the first MiB of any
    other file): what changes when the tensors' names, dtypes, shapes or offsets change."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if path.suffix == ".safetensors" and 0 < n <= size - 8:
            return hashlib.sha256(head + f.read(n)).hexdigest()
        f.seek(0)
        return hashlib.sha256(f.read(1 << 20)).hexdigest()


def file_fingerprint(path: str | os.PathLike[str], *, full_hash_limit: int = FULL_HASH_LIMIT) -> dict[str, Any]:
    """``{"size", "sha256"}`` for a file up to ``full_hash_limit`` bytes; for a larger one
    ``{"size", "mtime_ns", "header_sha256"}`` (content hashing 40 GB on every run would cost more
    than the stages it lets us skip)."""
    path = Path(path)
    st = path.stat()
    if st.st_size <= full_hash_limit:
        return {"size": st.st_size, "sha256": sha256_file(path)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": _header_sha256(path, st.st_size)}


def folder_fingerprint(folder: str | os.PathLike[str], *, suffixes: Iterable[str] = INPUT_SUFFIXES,
                       full_hash_limit: int = FULL_HASH_LIMIT) -> dict[str, dict[str, Any]]:
    """Fingerprints of the model files at the top level of ``folder`` (file name -> fingerprint)."""
    folder = Path(folder)
    suffixes = tuple(suffixes)
    out: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(suffixes) or not p.is_file():
            continue
        out[p.name] = file_fingerprint(p, full_hash_limit=full_hash_limit)
    return out


def input_fingerprint(base_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                      *, full_hash_limit: int = FULL_HASH_LIMIT) -> dict[str, Any]:
    """Fingerprints of everything a build reads from the base and adapter folders. Folder paths
    are not part of it: a moved or copied folder with the same contents gives the same
    fingerprint (a copy changes mtimes, so only its large files look changed)."""
    return {"base": folder_fingerprint(base_dir, full_hash_limit=full_hash_limit),
            "adapter": folder_fingerprint(adapter_dir, full_hash_limit=full_hash_limit)}


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def stage_key(inputs: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """What decides whether a stage's recorded outputs are still valid."""
    return {"inputs": digest(inputs), "options": json.loads(json.dumps(dict(options), sort_keys=True, default=str)),
            "version": __version__}


# --------------------------------------------------------------------------- manifest


@dataclass
class StageEntry:
    key: dict[str, Any]
    outputs: dict[str, dict[str, Any]]  # file name (relative to OUT_DIR, or absolute) -> {"bytes", "sha256"}
    info: dict[str, Any] = field(default_factory=dict)
    finished: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "outputs": self.outputs, "info": self.info, "finished": self.finished}


class RunState:
    """The manifest ``OUT_DIR/.lora2gguf-state.json``. Load it, ask :meth:`done` before a stage,
    :meth:`record` after it."""

    def __init__(self, out_dir: str | os.PathLike[str], stages: dict[str, StageEntry] | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / STATE_NAME
        self.stages: dict[str, StageEntry] = dict(stages or {})

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> "RunState":
        """The folder's manifest; an unreadable or foreign one counts as empty (every stage is
        then redone), never as an error."""
        self = cls(out_dir)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return self
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            log.warning("%s is unreadable (%s); every stage will be redone", self.path, e)
            return self
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("stages"), dict):
            log.warning("%s is not a %s manifest; every stage will be redone", self.path, SCHEMA)
            return self
        for name, e in data["stages"].items():
            try:
                self.stages[name] = StageEntry(dict(e["key"]), dict(e["outputs"]), dict(e.get("info") or {}),
                                               str(e.get("finished", "")))
            except (KeyError, TypeError, ValueError):
                log.warning("%s: stage %r is malformed; it will be redone", self.path, name)
        return self

    def _resolve(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.out_dir / p

    def done(self, stage: str, key: Mapping[str, Any], *, check_hashes: bool = True) -> StageEntry | None:
        """The recorded entry if ``stage`` finished with this ``key`` and each of its outputs still
        has the recorded size (and SHA-256, unless ``check_hashes`` is False); otherwise None."""
        entry = self.stages.get(stage)
        if entry is None:
            return None
        if entry.key != json.loads(json.dumps(dict(key), sort_keys=True, default=str)):
            log.info("stage %s: inputs or options changed; redoing it", stage)
            return None
        for name, want in entry.outputs.items():
            path = self._resolve(name)
            try:
                size = path.stat().st_size
            except OSError:
                log.info("stage %s: %s is missing; redoing it", stage, path)
                return None
            if size != want.get("bytes") or (check_hashes and sha256_file(path) != want.get("sha256")):
                log.info("stage %s: %s changed since it was written; redoing it", stage, path)
                return None
        return entry

    def record(self, stage: str, key: Mapping[str, Any], outputs: Mapping[str | os.PathLike[str], str | None],
               info: Mapping[str, Any] | None = None) -> StageEntry:
        """Mark ``stage`` finished with ``key``; ``outputs`` maps each output path to its SHA-256
        (None: hash it here). Written atomically."""
        outs: dict[str, dict[str, Any]] = {}
        root = self.out_dir.resolve()
        for p, sha in outputs.items():
            full = Path(p).resolve()  # a path as the caller gives it (absolute, or relative to the cwd)
            rel = full.name if full.parent == root else str(full)
            outs[rel] = {"bytes": full.stat().st_size, "sha256": sha or sha256_file(full)}
        entry = StageEntry(json.loads(json.dumps(dict(key), sort_keys=True, default=str)), outs,
                           json.loads(json.dumps(dict(info or {}), default=str)),
                           _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.stages[stage] = entry
        self.save()
        return entry

    def recorded_bytes(self) -> int:
        """Bytes of the recorded outputs in OUT_DIR that are still there with their recorded size."""
        total = 0
        for entry in self.stages.values():
            for name, want in entry.outputs.items():
                path = self._resolve(name)
                try:
                    if path.parent.resolve() == self.out_dir.resolve() and path.stat().st_size == want.get("bytes"):
                        total += int(want["bytes"])
                except (OSError, TypeError, ValueError, KeyError):
                    continue
        return total

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self.save()

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "lora2gguf_version": __version__,
                "stages": {k: v.to_json() for k, v in self.stages.items()}}

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot write the run manifest ({e.strerror})") from None
