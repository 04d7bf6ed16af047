"""The run folder's lock and its manifest of stages, so that an interrupted run resumes.

- :class:`RunLock`: ``OUT_DIR/.lora2gguf.lock``, held with ``fcntl.flock`` while a run writes into
  the folder. A second run on the same folder gets an :class:`~lora2gguf.errors.OutputError` that
  names the folder and the other process' pid. The lock file is removed when the run ends.
- :class:`RunState`: ``OUT_DIR/.lora2gguf-state.json``. For each finished stage (``build``,
  ``quantize:Q8_0``, ``verify``...) it records a *key* (a digest of the stage's input
  fingerprints, its options and the lora2gguf version) and, for each output, its size, its SHA-256
  and a cheap fingerprint (:func:`output_fingerprint`: size, mtime, ctime, inode and a hash of
  sampled bytes, at most :data:`FINGERPRINT_MAX_BYTES` read whatever the file's size).
  A rerun skips a stage whose key is unchanged and whose outputs are unchanged: an output whose
  fingerprint is the recorded one is confirmed without reading it (a 40 GB GGUF in milliseconds);
  one whose fingerprint changed (touched, copied, moved to another disk) is hashed in full and
  confirmed only if its SHA-256 is the recorded one (the fingerprint is then refreshed). Anything
  else (stale, partial, edited, truncated, replaced, missing) is redone. :meth:`RunState.rehash`
  (``lora2gguf verify --rehash``) re-checks every full SHA-256. An entry is written only after the
  stage's outputs are renamed into place, so a killed run never leaves a stage marked finished.
  :meth:`RunState.input_sha256` does the same for a file a run reads but does not write (a
  ``--base-gguf`` of 13-40 GB): its full SHA-256 is recorded with its fingerprint in the
  manifest's ``inputs`` and taken from there while the fingerprint is unchanged.
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
#: an output's fingerprint hashes its first and last MiB and evenly spaced blocks in between
FINGERPRINT_HEAD = 1 << 20
FINGERPRINT_TAIL = 1 << 20
FINGERPRINT_BLOCKS = 8
FINGERPRINT_BLOCK = 64 << 10
#: the most bytes :func:`output_fingerprint` reads, whatever the file's size (2.5 MiB)
FINGERPRINT_MAX_BYTES = FINGERPRINT_HEAD + FINGERPRINT_TAIL + FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK
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


def fingerprint_ranges(size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges :func:`output_fingerprint` reads in a file of ``size`` bytes:
    the head, :data:`FINGERPRINT_BLOCKS` blocks evenly spaced between head and tail, the tail;
    clipped to the file, merged where they overlap (a file up to 2.5 MiB is read whole)."""
    ranges = [(0, FINGERPRINT_HEAD)]
    lo, hi = FINGERPRINT_HEAD, size - FINGERPRINT_TAIL
    gap = hi - lo - FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK  # what the blocks leave unread, in BLOCKS + 1 gaps
    if gap > FINGERPRINT_BLOCKS + 1:
        ranges += [(lo + (i + 1) * gap // (FINGERPRINT_BLOCKS + 1) + i * FINGERPRINT_BLOCK, FINGERPRINT_BLOCK)
                   for i in range(FINGERPRINT_BLOCKS)]
    elif hi > lo:
        ranges.append((lo, hi - lo))
    ranges.append((max(0, size - FINGERPRINT_TAIL), FINGERPRINT_TAIL))
    merged: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        end = min(off + n, size)
        if end <= off:
            continue
        if merged and off <= merged[-1][0] + merged[-1][1]:
            start = merged[-1][0]
            merged[-1] = (start, max(merged[-1][0] + merged[-1][1], end) - start)
        else:
            merged.append((off, end - off))
    return merged


def output_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A finished output's cheap fingerprint: ``{size, mtime_ns, ctime_ns, ino, sample_sha256}``,
    the last the SHA-256 of the bytes in :func:`fingerprint_ranges` (at most
    :data:`FINGERPRINT_MAX_BYTES` read, whatever the size). Any write to the file changes its
    mtime and ctime (ctime even when the mtime is set back); a replaced file has another inode; a
    truncated or extended one another size; the samples catch content changed under the same
    metadata in the header, the tail or the sampled blocks. Only a full hash sees everything:
    :meth:`RunState.rehash`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        h = hashlib.sha256(str(st.st_size).encode())
        for off, n in fingerprint_ranges(st.st_size):
            h.update(os.pread(fd, n, off))
    finally:
        os.close(fd)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sample_sha256": h.hexdigest()}


def _stat_matches(fp: Mapping[str, Any], st: os.stat_result) -> bool:
    return (fp.get("size") == st.st_size and fp.get("mtime_ns") == st.st_mtime_ns
            and fp.get("ctime_ns") == st.st_ctime_ns and fp.get("ino") == st.st_ino)


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


#: how :meth:`RunState.done` confirmed an output: by its cheap fingerprint (nothing but a few MiB
#: read), by its full SHA-256 (the fingerprint had changed), or by its size alone (check_hashes=False)
CONFIRMED_BY = ("fingerprint", "sha256", "size")


@dataclass
class StageEntry:
    key: dict[str, Any]
    #: file name (relative to OUT_DIR, or absolute) -> {"bytes", "sha256", "fingerprint"}
    outputs: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    finished: str = ""
    #: set by :meth:`RunState.done`: file name -> how it was confirmed (one of :data:`CONFIRMED_BY`)
    confirmed: dict[str, str] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "outputs": self.outputs, "info": self.info, "finished": self.finished}


@dataclass(frozen=True)
class Rehashed:
    """One output's full SHA-256 against the recorded one (:meth:`RunState.rehash`)."""

    stage: str
    file: str
    result: str  # "ok", "differs" or "missing"
    sha256: str | None
    recorded: str | None


class RunState:
    """The manifest ``OUT_DIR/.lora2gguf-state.json``. Load it, ask :meth:`done` before a stage,
    :meth:`record` after it."""

    def __init__(self, out_dir: str | os.PathLike[str], stages: dict[str, StageEntry] | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / STATE_NAME
        self.stages: dict[str, StageEntry] = dict(stages or {})
        #: absolute path -> {"bytes", "sha256", "fingerprint"} of files read, not written (input_sha256)
        self.inputs: dict[str, dict[str, Any]] = {}

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
        inputs = data.get("inputs")
        if isinstance(inputs, dict):
            self.inputs = {k: dict(v) for k, v in inputs.items()
                           if isinstance(v, dict) and isinstance(v.get("sha256"), str)
                           and isinstance(v.get("fingerprint"), dict)}
        return self

    def _resolve(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.out_dir / p

    def done(self, stage: str, key: Mapping[str, Any], *, check_hashes: bool = True) -> StageEntry | None:
        """The recorded entry if ``stage`` finished with this ``key`` and each of its outputs is
        unchanged; otherwise None. An output is unchanged when its cheap fingerprint
        (:func:`output_fingerprint`) is the recorded one, or else when its full SHA-256 is (the
        recorded fingerprint is then refreshed and the manifest saved, so that the next rerun is
        cheap again). ``check_hashes=False``: sizes only. The entry's ``confirmed`` says, per
        output, which of these confirmed it."""
        entry = self.stages.get(stage)
        if entry is None:
            return None
        if entry.key != json.loads(json.dumps(dict(key), sort_keys=True, default=str)):
            log.info("stage %s: inputs or options changed; redoing it", stage)
            return None
        confirmed: dict[str, str] = {}
        refreshed: dict[str, dict[str, Any]] = {}
        for name, want in entry.outputs.items():
            path = self._resolve(name)
            try:
                st = path.stat()
            except OSError:
                log.info("stage %s: %s is missing; redoing it", stage, path)
                return None
            if st.st_size != want.get("bytes"):
                log.info("stage %s: %s has %d bytes, not the %s written; redoing it", stage, path, st.st_size,
                         want.get("bytes"))
                return None
            if not check_hashes:
                confirmed[name] = "size"
                continue
            recorded = want.get("fingerprint")
            try:
                fp = output_fingerprint(path)
                if isinstance(recorded, dict) and _stat_matches(recorded, st) and fp == recorded:
                    confirmed[name] = "fingerprint"
                    continue
                log.info("stage %s: %s was touched, copied or changed since it was written; hashing it", stage, path)
                same = sha256_file(path) == want.get("sha256")
            except OSError as e:
                log.info("stage %s: %s is unreadable (%s); redoing it", stage, path, e.strerror)
                return None
            if not same:
                log.info("stage %s: %s changed since it was written; redoing it", stage, path)
                return None
            refreshed[name] = fp
            confirmed[name] = "sha256"
        if refreshed:
            for name, fp in refreshed.items():
                entry.outputs[name]["fingerprint"] = fp
            self.save()
        entry.confirmed = confirmed
        return entry

    def input_sha256(self, path: str | os.PathLike[str]) -> tuple[str, str]:
        """The full SHA-256 of a file the run reads but does not write (a ``--base-gguf``, 13-40 GB),
        without reading it again while it is unchanged: the SHA-256 recorded with the file's
        :func:`output_fingerprint` when that fingerprint is still the file's ("fingerprint": a few
        MiB read), else hashed in full and recorded ("sha256"; an edited, touched, copied or
        replaced file). The fingerprint recorded is the one taken before hashing, so a file
        changed while it was being read is hashed again next time. Returns (sha256, how)."""
        full = Path(path).resolve()
        name = str(full)
        before = output_fingerprint(full)
        want = self.inputs.get(name)
        if want is not None and want.get("fingerprint") == before and want.get("bytes") == before["size"]:
            return str(want["sha256"]), "fingerprint"
        if want is not None:
            log.info("%s changed, or was touched or copied, since its SHA-256 was recorded; hashing it", full)
        sha = sha256_file(full)
        self.inputs[name] = {"bytes": before["size"], "sha256": sha, "fingerprint": before}
        self.save()
        return sha, "sha256"

    def rehash(self) -> list[Rehashed]:
        """The full SHA-256 of every recorded output against the recorded one. A stage with an
        output that differs or is missing is forgotten (the next build redoes it); outputs that
        match get a fresh fingerprint. The manifest is saved when anything changed."""
        results: list[Rehashed] = []
        stale: set[str] = set()
        changed = False
        for stage, entry in self.stages.items():
            for name, want in entry.outputs.items():
                path = self._resolve(name)
                try:
                    fp = output_fingerprint(path)
                    sha = sha256_file(path)
                except OSError:
                    results.append(Rehashed(stage, name, "missing", None, want.get("sha256")))
                    stale.add(stage)
                    continue
                ok = sha == want.get("sha256") and fp["size"] == want.get("bytes")
                results.append(Rehashed(stage, name, "ok" if ok else "differs", sha, want.get("sha256")))
                if not ok:
                    stale.add(stage)
                elif want.get("fingerprint") != fp:
                    want["fingerprint"] = fp
                    changed = True
        for stage in stale:
            log.info("stage %s: an output changed since it was written; it will be redone", stage)
            self.stages.pop(stage, None)
        if stale or changed:
            self.save()
        return results

    def record(self, stage: str, key: Mapping[str, Any], outputs: Mapping[str | os.PathLike[str], str | None],
               info: Mapping[str, Any] | None = None) -> StageEntry:
        """Mark ``stage`` finished with ``key``; ``outputs`` maps each output path to its SHA-256
        (None: hash it here). Each output's :func:`output_fingerprint` is recorded with it. Written
        atomically."""
        outs: dict[str, dict[str, Any]] = {}
        root = self.out_dir.resolve()
        for p, sha in outputs.items():
            full = Path(p).resolve()  # a path as the caller gives it (absolute, or relative to the cwd)
            rel = full.name if full.parent == root else str(full)
            fp = output_fingerprint(full)
            outs[rel] = {"bytes": fp["size"], "sha256": sha or sha256_file(full), "fingerprint": fp}
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
        out = {"schema": SCHEMA, "lora2gguf_version": __version__,
               "stages": {k: v.to_json() for k, v in self.stages.items()}}
        if self.inputs:
            out["inputs"] = self.inputs
        return out

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
