"""Inputs named by Hugging Face hub id, resolved to a local folder through huggingface_hub.

    src = resolve("org/base-model", "base")   # a Source: the folder to read, and what it is
    src.path    # ~/.cache/huggingface/hub/models--org--base-model/snapshots/<commit>

BASE and ADAPTER are a local folder (an existing path always wins) or a hub id ``org/name`` with an
optional ``@revision`` (branch, tag or commit). For a hub id:

1. **The cache first.** The Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, laid out
   as huggingface_hub lays it out: ``refs/<revision>``, ``snapshots/<commit>/``, ``blobs/``). A
   complete snapshot of the revision (config, every safetensors file its index names, a tokenizer
   for a base) is used as it is, without a single request. With ``HF_HUB_OFFLINE=1`` an incomplete
   one is an error naming what is missing.
2. **Otherwise the hub**, through huggingface_hub: the revision's commit and file list with sizes.
   Only the files lora2gguf reads are chosen (:func:`select`): config and generation config,
   tokenizer files and chat template, the safetensors index and the shards it names; for an
   adapter, adapter_config.json and its safetensors. Pickles (``*.bin``, ``*.pt``, ``*.pth``,
   ``*.ckpt``, ``*.pkl``) and code are never fetched: a repo whose weights are pickles only is
   refused from its file list, before a byte is downloaded.
3. **The bytes are known before the first one.** The file list's sizes, less what the cache
   already holds, are checked against the cache's free space before anything is fetched, and are
   reported through ``progress`` up front.
4. **Weights are resumable and fetched in parallel.** Each weights file goes into a partial file
   in the cache's ``blobs/`` that survives an interruption (``<etag>.lora2gguf-partial``); the
   next run resumes it with an HTTP Range request, and the file joins the snapshot only once its
   SHA-256 is the one the hub states (its LFS etag). Small files go through ``hf_hub_download``.

A base whose weights must be downloaded can first be *previewed*: ``resolve(..., weights=False)``
fetches the small files and reads each shard's safetensors header with a Range request into a
stand-in folder (sparse files of the real size holding the real header bytes), so doctor inspects
everything, and counts the download in its disk check, before a byte of weights is fetched;
:meth:`Source.fetch` then downloads them. The stand-in is a temporary folder, never the cache.

Errors are :class:`~lora2gguf.errors.HubError` naming the repo, the revision and the fix (gated,
missing or private repos, revisions that do not exist, no token, the hub out of reach, offline).
Nothing here prints; progress goes through ``progress(stage, done, total, detail)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import HubError, InputError, Lora2GGUFError, OutputError, UnsupportedError

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, str], None]

#: ``org/name`` or ``org/name@revision``
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.][A-Za-z0-9_.-]*)(?:@(?P<rev>[^@\s]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

BASE, ADAPTER = "base", "adapter"
BASE_CONFIGS = ("config.json", "generation_config.json")
BASE_INDEX = "model.safetensors.index.json"
BASE_SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
ADAPTER_SINGLE = "adapter_model.safetensors"
#: files that can run code when loaded (pickles) or are code: never downloaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".dylib", ".dll", ".exe", ".sh")
PARTIAL_SUFFIX = ".lora2gguf-partial"
#: weights files fetched at once
PARALLEL = 4
#: the first request for a safetensors header asks for this many bytes (most headers fit)
HEADER_PROBE = 100_000
MAX_HEADER = 100 * 1024 * 1024


def _tokenizer_files() -> tuple[str, ...]:
    from .inspect import TOKENIZER_FILES

    return TOKENIZER_FILES


# --------------------------------------------------------------------------------------- specs


def parse_spec(spec: str | os.PathLike[str], revision: str | None = None) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` names a hub repo, None when it is a local path.

    An existing path is always local; so is anything absolute or starting with ``.`` or ``~``.
    ``org/name@rev`` carries its revision; ``revision`` (``--base-revision``) gives one too, and
    both at once must agree."""
    text = os.fspath(spec)
    m = HUB_ID.match(text)
    if isinstance(spec, Path) or m is None or Path(text).exists() or text.startswith((".", "~", "/")):
        if revision is not None:
            raise InputError(f"{text}: a revision ({revision!r}) was given, but {text} is a local folder"
                             + ("" if Path(text).exists() else " (and it does not exist)")
                             + "; a revision applies to a hub id such as org/name")
        return None
    rev = m.group("rev")
    if rev is not None and revision is not None and rev != revision:
        raise InputError(f"{text}: two revisions given ({rev!r} after @, {revision!r} as an option); give one")
    return m.group("repo"), rev or revision


# -------------------------------------------------------------------------------------- source


@dataclass
class Weight:
    """One weights file to fetch: where from, what it must be, and how much of it the cache holds."""

    name: str
    size: int
    etag: str
    url: str
    same_host: bool = True
    have: int = 0  # bytes of a partial download already in the cache

    @property
    def remaining(self) -> int:
        return max(self.size - self.have, 0)


@dataclass
class Source:
    """What a BASE or ADAPTER argument was resolved to. ``path`` is the folder lora2gguf reads: the
    local folder, the cache's snapshot, or (while ``pending``) the header-only stand-in."""

    spec: str
    role: str
    path: Path
    repo: str | None = None
    revision: str | None = None  # as asked for (None: the repo's default branch)
    commit: str | None = None
    cache: Path | None = None
    from_cache: bool = False  # complete in the cache: nothing was asked of the hub
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes, the files read
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not fetched
    downloaded_bytes: int = 0
    pending: list[Weight] = field(default_factory=list)
    preview: Path | None = None  # the header-only stand-in, removed by close()
    preview_root: Path | None = None  # the temporary folder holding it
    snapshot: Path | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo is not None

    @property
    def label(self) -> str:
        if not self.is_hub:
            return str(self.path)
        at = f"{self.repo}@{self.revision}" if self.revision else self.repo
        return f"{at} (commit {self.commit[:12] if self.commit else '?'})"

    @property
    def pending_bytes(self) -> int:
        return sum(w.remaining for w in self.pending)

    def to_download(self) -> "Download | None":
        """The download still to come, for doctor's disk check (None when nothing is pending)."""
        if not self.pending:
            return None
        free = _free(self.cache)
        return Download(self.label, self.pending_bytes, str(self.cache), free)

    def fetch(self, progress: ProgressFn | None = None) -> "Source":
        """Download the pending weights (after the disk check), then read from the snapshot."""
        if self.pending:
            _require_free(self, self.pending_bytes)
            self.downloaded_bytes += _download(self, self.pending, progress)
            self.pending = []
            _write_ref(self)
        self.close()
        if self.snapshot is not None:
            self.path = self.snapshot
        return self

    def relabel(self, report) -> None:
        """A doctor report made on the header-only stand-in, told in terms of the snapshot the files
        will be in (the stand-in is a temporary folder)."""
        if self.preview is None or self.snapshot is None:
            return
        old, new = str(self.preview), str(self.snapshot)
        for f in report.findings:
            f.what, f.why, f.fix = (t.replace(old, new) for t in (f.what, f.why, f.fix))
        if Path(report.base_dir) == self.preview:
            report.base_dir = self.snapshot

    def close(self) -> None:
        """Remove the header-only stand-in folder, if any."""
        if self.preview is not None:
            shutil.rmtree(self.preview_root or self.preview, ignore_errors=True)
            if self.path == self.preview and self.snapshot is not None:
                self.path = self.snapshot
            self.preview = None

    def to_json(self) -> dict[str, Any]:
        """The record run.json keeps: the repo, the revision asked for, the commit resolved."""
        if not self.is_hub:
            return {"spec": self.spec, "hub": False, "path": str(Path(self.path).resolve())}
        return {"spec": self.spec, "hub": True, "repo": self.repo, "revision": self.revision,
                "commit": self.commit, "path": str(self.snapshot or self.path), "cache": str(self.cache),
                "from_cache": self.from_cache, "downloaded_bytes": self.downloaded_bytes,
                "files": dict(sorted(self.files.items())), "skipped": dict(sorted(self.skipped.items()))}


@dataclass(frozen=True)
class Download:
    """Bytes still to be downloaded into the Hugging Face cache (doctor counts them)."""

    what: str
    bytes: int
    where: str
    free_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "bytes": self.bytes, "where": self.where, "free_bytes": self.free_bytes}


# ---------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    small: tuple[str, ...]
    weights: tuple[str, ...]
    skipped: dict[str, str]


def _reason(name: str) -> str:
    low = name.lower()
    if "/" in name:
        return "in a subfolder (lora2gguf reads the top level)"
    if low.endswith(PICKLE_SUFFIXES) or low.endswith(".bin.index.json"):
        return "pickle: lora2gguf never downloads or unpickles pickles"
    if low.endswith(CODE_SUFFIXES):
        return "code: lora2gguf never downloads or runs a repo's code"
    return "not read by lora2gguf"


def select(role: str, names: Iterable[str], index: Mapping[str, Any] | None = None, *,
           where: str = "the repo") -> Selection:
    """The files of a repo lora2gguf reads, from its file names (and, for a sharded checkpoint,
    the weight map of its safetensors index). Raises when the repo has no config or holds its
    weights only as pickles (refused before a byte is downloaded)."""
    names = set(names)
    top = {n for n in names if "/" not in n}
    if role == BASE:
        config, index_name, single = "config.json", BASE_INDEX, BASE_SINGLE
        small_names = (*BASE_CONFIGS, index_name, *_tokenizer_files())
    else:
        config, index_name, single = ADAPTER_CONFIG, ADAPTER_INDEX, ADAPTER_SINGLE
        small_names = (config, index_name, *_tokenizer_files())
    pickles = sorted(n for n in top if n.lower().endswith(PICKLE_SUFFIXES))
    if index_name in top:
        if index is None:
            weights: tuple[str, ...] = ()  # known once the index is read
        else:
            wmap = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                raise InputError(f"{where}: {index_name} has no weight_map of tensor names to files")
            weights = tuple(sorted(set(wmap.values())))
            bad = [w for w in weights if "/" in w or not w.endswith(".safetensors")]
            if bad:
                raise InputError(f"{where}: {index_name} names {bad[0]!r}, not a safetensors file of the top level")
            missing = [w for w in weights if w not in top]
            if missing:
                raise InputError(f"{where}: {index_name} names {missing[0]!r}, which the repo does not hold; "
                                 "the repo is incomplete or its index is stale")
    elif single in top:
        weights = (single,)
    elif pickles:
        kind = "model" if role == BASE else "adapter"
        raise UnsupportedError(
            f"{where} holds its {kind} weights only as pickles ({', '.join(pickles[:4])}"
            f"{', ...' if len(pickles) > 4 else ''}): lora2gguf never downloads or unpickles pickles (loading one can "
            "run code). Nothing was downloaded. Use a revision or a copy of the repo with safetensors weights (many "
            "repos have a `refs/pr/N` conversion by the Hub's safetensors bot), or convert it yourself with a tool "
            "you trust and pass the folder")
    else:
        raise InputError(f"{where}: no {single} and no {index_name}: "
                         + ("is it a model repo in the transformers layout?" if role == BASE
                            else "is it a PEFT adapter repo (adapter_config.json, adapter_model.safetensors)?"))
    if config not in top:
        raise InputError(f"{where}: no {config}: "
                         + ("is it a model repo in the transformers layout?" if role == BASE
                            else "is it a PEFT adapter repo (adapter_config.json, adapter_model.safetensors)?"))
    small = tuple(n for n in small_names if n in top)
    chosen = set(small) | set(weights)
    skipped = {n: _reason(n) for n in sorted(names - chosen)
               if not (index_name in top and index is None and n.endswith(".safetensors") and "/" not in n)}
    return Selection(small, weights, skipped)


# ------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """The Hugging Face hub cache huggingface_hub uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _storage(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _cached(cache: Path, repo: str, revision: str | None, role: str) -> tuple[str | None, Path | None, list[str]]:
    """(commit, snapshot folder, what is missing) of the revision in the cache; the list is empty
    when the snapshot is complete (config, every weights file, a tokenizer for a base)."""
    storage = _storage(cache, repo)
    rev = revision or "main"
    commit = None
    if COMMIT.match(rev):
        commit = rev
    else:
        ref = storage / "refs" / rev
        try:
            commit = ref.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None, None, ["the revision"]
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        return commit, None, ["the snapshot"]
    missing = []
    config, index_name, single = ((("config.json"), BASE_INDEX, BASE_SINGLE) if role == BASE
                                  else (ADAPTER_CONFIG, ADAPTER_INDEX, ADAPTER_SINGLE))
    if not (snap / config).is_file():
        missing.append(config)
    if (snap / index_name).is_file():
        index = _json_file(snap / index_name)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict):
            missing.append(f"a readable {index_name}")
        else:
            missing += sorted(w for w in set(map(str, wmap.values())) if not (snap / w).is_file())
    elif not (snap / single).is_file():
        missing.append(f"{single} (or {index_name})")
    if role == BASE and not any((snap / t).is_file() for t in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json")
    return commit, snap, missing


def _cached_source(spec: str, role: str, repo: str, revision: str | None, cache: Path, commit: str,
                   snap: Path) -> Source:
    names = [p.name for p in snap.iterdir()]
    index = _json_file(snap / (BASE_INDEX if role == BASE else ADAPTER_INDEX))
    at = f"{repo}@{revision}" if revision else repo
    sel = select(role, names, index if isinstance(index, dict) else None, where=f"{at} in the cache")
    files = {n: (snap / n).stat().st_size for n in (*sel.small, *sel.weights)}
    return Source(spec, role, snap, repo, revision, commit, cache, from_cache=True, files=files,
                  skipped=dict(sel.skipped), snapshot=snap)


def _free(path: Path | None) -> int | None:
    if path is None:
        return None
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _require_free(src: Source, need: int) -> None:
    free = _free(src.cache)
    if free is not None and need > free:
        raise OutputError(
            f"{src.label}: {_gb(need)} to download into the Hugging Face cache {src.cache}, which has {_gb(free)} "
            f"free; nothing was downloaded. Free {_gb(need - free)} or more there, or point HF_HUB_CACHE (or "
            "HF_HOME) at a disk with room, or pass a local folder that holds the model")


def _write_ref(src: Source) -> None:
    """refs/<revision> -> commit, as huggingface_hub records a branch or tag it resolved."""
    rev = src.revision or "main"
    if src.cache is None or src.commit is None or COMMIT.match(rev):
        return
    ref = _storage(src.cache, src.repo or "") / "refs" / rev
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if ref.is_file() and ref.read_text(encoding="utf-8").strip() == src.commit:
            return
        tmp = ref.with_name(ref.name + f".{os.getpid()}.tmp")
        tmp.write_text(src.commit, encoding="utf-8")
        tmp.replace(ref)
    except OSError as e:
        log.warning("could not record %s -> %s in %s: %s", rev, src.commit, ref, e)


# ------------------------------------------------------------------------------------ errors


def _network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(
        names & {"ConnectError", "TimeoutException", "NetworkError", "RemoteProtocolError", "ProxyError"})


def _hub_error(e: BaseException, repo: str, revision: str | None, what: str = "") -> Lora2GGUFError:
    """A huggingface_hub exception as a HubError naming the repo, the revision and the fix."""
    from huggingface_hub import constants, errors as hfe, get_token

    if isinstance(e, Lora2GGUFError):
        return e
    at = f"{repo}@{revision}" if revision else repo
    web = f"{constants.ENDPOINT}/{repo}"
    has_token = get_token() is not None
    login = "log in with `hf auth login`, or set HF_TOKEN to a token of an account that can read it"
    if isinstance(e, hfe.OfflineModeIsEnabled):
        return HubError(f"{at}: not in the Hugging Face cache ({cache_root()}) and HF_HUB_OFFLINE is set, so the hub "
                        "is not asked. Unset HF_HUB_OFFLINE to download it, or point HF_HUB_CACHE / HF_HOME at the "
                        "cache that holds it")
    if isinstance(e, hfe.GatedRepoError):
        return HubError(f"{at} is gated: its files are shared only with accounts that accepted its conditions. "
                        f"Accept them at {web}, then "
                        + ("check that your token (HF_TOKEN or `hf auth login`) belongs to that account"
                           if has_token else login))
    if isinstance(e, hfe.RevisionNotFoundError):
        return HubError(f"{repo} has no revision {revision!r}: give a branch, tag or commit that exists (see "
                        f"{web}/tree/main and its commits), or leave the revision out for the default branch")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return HubError(f"{repo}: no such model repo on {constants.ENDPOINT}, or it is private"
                        + (" and your token cannot read it: check the name, and that the token's account has access"
                           if has_token else f": check the name; if it is private, {login}")
                        + f" (no local folder {repo!r} exists either)")
    if isinstance(e, hfe.RemoteEntryNotFoundError):
        return HubError(f"{at}: the hub has no {what or 'such file'} at that revision (the repo changed while it "
                        "was read?): run again")
    if isinstance(e, hfe.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(f"{at}: the hub refused access ({status}) to {what or 'the repo'}: "
                            + ("your token lacks the permission: use a token that can read it" if has_token else login))
        return HubError(f"{at}: the hub answered {status} for {what or 'the repo'} ({str(e).splitlines()[0]}): "
                        "try again later")
    if _network_error(e):
        return HubError(f"{at}: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {e}). Check the network, the "
                        "proxy and HF_ENDPOINT; a model already in the Hugging Face cache is used without the network "
                        "(HF_HUB_OFFLINE=1)")
    if isinstance(e, OSError):
        return OutputError(f"{at}: downloading {what or 'the repo'} into {cache_root()} failed: {e}")
    return HubError(f"{at}: huggingface_hub failed on {what or 'the repo'}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------- resolve


def resolve(spec: str | os.PathLike[str], role: str, *, revision: str | None = None,
            progress: ProgressFn | None = None, weights: bool = True) -> Source:
    """Resolve a BASE (``role="base"``) or ADAPTER argument to a :class:`Source`.

    ``weights=False``: when weights must be downloaded, fetch only the small files and the
    shards' safetensors headers into a header-only stand-in (``Source.path`` while
    ``Source.pending``); :meth:`Source.fetch` downloads the rest. A :class:`Source` is returned
    as it is (already resolved)."""
    if isinstance(spec, Source):
        return spec
    parsed = parse_spec(spec, revision)
    if parsed is None:
        return Source(os.fspath(spec), role, Path(spec))
    repo, rev = parsed
    cache = cache_root()
    commit, snap, missing = _cached(cache, repo, rev, role)
    if missing == ["tokenizer.json"] and _offline():
        missing = []  # config and weights are there: offline, doctor says what the tokenizer lacks
    if not missing and commit is not None and snap is not None:
        return _cached_source(os.fspath(spec), role, repo, rev, cache, commit, snap)
    at = f"{repo}@{rev}" if rev else repo
    if _offline():
        where = f"the cache holds {commit[:12]} without {', '.join(missing[:3])}" if snap is not None else \
            "the cache does not hold it"
        raise HubError(f"{at}: HF_HUB_OFFLINE is set and {where} ({_storage(cache, repo)}). Unset HF_HUB_OFFLINE to "
                       "download what is missing, or point HF_HUB_CACHE / HF_HOME at the cache that holds it")
    src = _from_hub(os.fspath(spec), role, repo, rev, cache, progress)
    if not src.pending:
        _write_ref(src)
        return src
    if not weights and role == BASE and _make_preview(src):
        return src  # doctor reads the stand-in; fetch() downloads the weights
    return src.fetch(progress)


def _from_hub(spec: str, role: str, repo: str, rev: str | None, cache: Path, progress: ProgressFn | None) -> Source:
    from huggingface_hub import HfApi

    at = f"{repo}@{rev}" if rev else repo
    try:
        info = HfApi().model_info(repo, revision=rev, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - every huggingface_hub failure becomes a HubError
        raise _hub_error(e, repo, rev) from None
    commit = info.sha
    if not commit:
        raise HubError(f"{at}: the hub did not say which commit the revision is; try again")
    sizes = {s.rfilename: int(s.size or (s.lfs.size if s.lfs else 0) or 0) for s in (info.siblings or [])}
    sel = select(role, sizes, where=at)  # refuses a pickles-only repo here, before any download
    snap = _storage(cache, repo) / "snapshots" / commit
    src = Source(spec, role, snap, repo, rev, commit, cache, snapshot=snap)
    need = sum(sizes[n] for n in sel.small if not (snap / n).is_file())
    need += sum(sizes[n] for n in sel.weights if not (snap / n).is_file())
    _require_free(src, need)  # before the first byte (the shards of an index are checked again below)
    index_name = BASE_INDEX if role == BASE else ADAPTER_INDEX
    paths = {}
    fetched = [n for n in sel.small if not (snap / n).is_file()]
    order = ([index_name] if index_name in sel.small else []) + [n for n in sel.small if n != index_name]
    for i, name in enumerate(order):
        if progress:
            progress("files", i, len(order), f"{repo}: {name}")
        paths[name] = _fetch_small(repo, rev, commit, name, cache)
        if not (snap / name).is_file():
            raise HubError(f"{at}: {name} was downloaded but is not in the snapshot {snap}")
    if order and progress:
        progress("files", len(order), len(order), f"{repo}: config and tokenizer files")
    if index_name in sel.small:
        sel = select(role, sizes, _json_file(paths[index_name]), where=at)
    src.files = {n: sizes[n] for n in (*sel.small, *sel.weights)}
    src.skipped = dict(sel.skipped)
    src.downloaded_bytes = sum(sizes[n] for n in fetched)
    src.pending = [w for w in (_plan(repo, commit, n, sizes[n], cache) for n in sel.weights) if w is not None]
    if src.pending and progress:
        progress("download", 0, src.pending_bytes,
                 f"{repo}: {len(src.pending)} file(s), {_gb(src.pending_bytes)} to download into {cache}")
    return src


class _Quiet:
    """A progress bar class for huggingface_hub that draws nothing (lora2gguf reports progress itself)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def close(self):
        pass


def _fetch_small(repo: str, rev: str | None, commit: str, name: str, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, revision=commit, cache_dir=str(cache), tqdm_class=_Quiet))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo, rev, name) from None


def _plan(repo: str, commit: str, name: str, size: int, cache: Path) -> Weight | None:
    """The file's etag, size and location (huggingface_hub's HEAD request), and what the cache
    holds of it; None when the snapshot has it already."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    storage = _storage(cache, repo)
    if (storage / "snapshots" / commit / name).is_file():
        return None
    url = hf_hub_url(repo, name, revision=commit)
    try:
        meta = get_hf_file_metadata(url)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo, commit, name) from None
    if not meta.etag:
        raise HubError(f"{repo}@{commit[:12]}: the hub gave no etag for {name}; try again")
    location = meta.location or url
    w = Weight(name, int(meta.size if meta.size is not None else size), meta.etag, location,
               same_host=_host(location) == _host(url))
    part = storage / "blobs" / (meta.etag + PARTIAL_SUFFIX)
    if (storage / "blobs" / meta.etag).is_file():
        w.have = w.size
    elif part.is_file():
        w.have = min(part.stat().st_size, w.size)
    return w


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc.lower()


# ------------------------------------------------------------------------------------ preview


def _make_preview(src: Source) -> bool:
    """The header-only stand-in for doctor: the small files (links into the snapshot), and for
    each weights file a sparse file of its size holding its real safetensors header (and the
    few-hundred-byte bitsandbytes quant states inspect reads), from the hub (ranged reads) or from
    the cache when the file is there already (a link would lead out of the stand-in). False (and
    no stand-in) when this filesystem would allocate the sparse files."""
    assert src.snapshot is not None and src.repo is not None and src.commit is not None
    # laid out as the cache is (models--org--name/snapshots/<commit>), so what doctor says of the
    # folder (the repo it is, for one) holds for the snapshot too
    root = Path(tempfile.mkdtemp(prefix="lora2gguf-headers-"))
    d = root / src.snapshot.parent.parent.name / "snapshots" / src.commit
    try:
        d.mkdir(parents=True)
        pending = {w.name: w for w in src.pending}
        weights = {n for n in src.files if n.endswith(".safetensors")}
        for name in src.files:
            if name not in pending and name not in weights:
                _link_or_copy(src.snapshot / name, d / name)
        for name in sorted(weights - set(pending)):  # in the cache already: its header, read here
            local = src.snapshot / name
            if not _stub(src, name, local.stat().st_size, d / name, _local_reader(local)):
                shutil.rmtree(root, ignore_errors=True)
                return False
        for w in src.pending:
            if not _stub(src, w.name, w.size, d / w.name, lambda a, b, what, w=w: _range(w, a, b, what, src)):
                shutil.rmtree(root, ignore_errors=True)
                return False
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    src.preview, src.preview_root = d, root
    src.path = d
    return True


def _link_or_copy(target: Path, link: Path) -> None:
    try:
        link.symlink_to(target)
    except OSError:
        shutil.copyfile(target, link)


def _headers(w: Weight) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    h = dict(build_hf_headers())
    if not w.same_host:  # a CDN's signed URL: the token stays on the hub
        h = {k: v for k, v in h.items() if k.lower() != "authorization"}
    return h


def _range(w: Weight, start: int, end: int, what: str, src: Source) -> bytes | None:
    """Bytes ``start..end`` (inclusive) of a remote file; None when the server ignores the Range."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    want = end - start + 1
    try:
        with get_session().stream("GET", w.url, headers={**_headers(w), "Range": f"bytes={start}-{end}"},
                                  follow_redirects=True) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if r.status_code != 206 and start > 0:
                return None
            out = bytearray()
            for chunk in r.iter_bytes():
                out += chunk
                if len(out) >= want:
                    break
            return bytes(out[:want])
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, src.repo or "", src.revision, what) from None


def _local_reader(path: Path) -> Callable[[int, int, str], bytes]:
    def read(start: int, end: int, what: str) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start + 1)
    return read


def _stub(src: Source, name: str, size: int, path: Path, read: Callable[[int, int, str], bytes | None]) -> bool:
    """Write ``path``: ``size`` bytes, sparse, holding the safetensors header ``read`` gives
    (``read(start, end, what)``: those bytes, or None when they cannot be read alone)."""
    from .inspect import BNB_STATE

    at = f"{src.repo}@{src.revision}" if src.revision else src.repo
    head = read(0, min(HEADER_PROBE, size) - 1, f"the safetensors header of {name}") or b""
    if len(head) < 8:
        raise HubError(f"{at}: {name} is shorter than a safetensors header ({len(head)} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise HubError(f"{at}: {name} does not start with a valid safetensors header (length {n}); the repo's file "
                       "is corrupt or not safetensors")
    if len(head) < 8 + n:
        head += read(len(head), 7 + n, f"the safetensors header of {name}") or b""
    head = head[:8 + n]
    extra: list[tuple[int, bytes]] = []
    try:
        header = json.loads(head[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        header = {}  # doctor reports the broken header from the stand-in, as it would from the file
    for name, entry in (header.items() if isinstance(header, dict) else ()):
        offs = entry.get("data_offsets") if isinstance(entry, dict) else None
        if BNB_STATE in name and isinstance(offs, list) and len(offs) == 2 and 0 <= offs[1] - offs[0] <= 65536:
            b0, b1 = 8 + n + int(offs[0]), 8 + n + int(offs[1])
            if b1 > b0:
                data = read(b0, b1 - 1, f"a bitsandbytes quant state of {name}")
                if data is None:
                    return False
                extra.append((b0, data))
    with open(path, "wb") as f:
        f.write(head)
        for off, data in extra:
            f.seek(off)
            f.write(data)
        f.truncate(size)
    st = os.stat(path)
    blocks = getattr(st, "st_blocks", None)
    allocated = blocks * 512 if blocks is not None else size
    return allocated <= len(head) + sum(len(d) for _, d in extra) + 64 * 4096 + 1024 * 1024 or size < (1 << 20)


# ----------------------------------------------------------------------------------- download


class _Cancelled(Exception):
    pass


class _Sink:
    """The file huggingface_hub's http_get writes into: hashes, counts and stops on cancel."""

    def __init__(self, fh, sha, on_bytes: Callable[[int], None], cancel: threading.Event, have: int):
        self.fh, self.sha, self.on_bytes, self.cancel, self.have = fh, sha, on_bytes, cancel, have

    def write(self, data: bytes) -> int:
        if self.cancel.is_set():
            raise _Cancelled()
        n = self.fh.write(data)
        self.fh.flush()
        if self.sha is not None:
            self.sha.update(data)
        self.on_bytes(len(data))
        return n

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, *args) -> int:
        return self.fh.seek(*args)

    def truncate(self, *args) -> int:
        # the server ignored the Range: huggingface_hub starts the file over
        out = self.fh.truncate(*args)
        if self.sha is not None:
            self.sha = hashlib.sha256()
        self.on_bytes(-self.have)
        self.have = 0
        return out

    def flush(self) -> None:
        self.fh.flush()


def _hash_prefix(path: Path, sha) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            sha.update(chunk)


def _link_blob(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, as huggingface_hub links them."""
    if pointer.exists():
        return
    pointer.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except FileExistsError:
        pass
    except OSError:  # no symlinks here: the snapshot holds the file itself, as huggingface_hub does
        os.replace(blob, pointer)


def _lock(cache: Path, repo: str, etag: str):
    import contextlib

    try:
        from huggingface_hub.utils import WeakFileLock
    except ImportError:  # pragma: no cover - older huggingface_hub
        return contextlib.nullcontext()
    path = cache / ".locks" / ("models--" + repo.replace("/", "--")) / f"{etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return WeakFileLock(str(path))


def _fetch_weight(src: Source, w: Weight, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
    from huggingface_hub.file_download import http_get

    assert src.cache is not None and src.repo is not None and src.snapshot is not None
    storage = _storage(src.cache, src.repo)
    blob = storage / "blobs" / w.etag
    pointer = src.snapshot / w.name
    at = f"{src.repo}@{src.revision}" if src.revision else src.repo
    blob.parent.mkdir(parents=True, exist_ok=True)
    with _lock(src.cache, src.repo, w.etag):
        if not blob.is_file():
            part = blob.with_name(blob.name + PARTIAL_SUFFIX)
            have = part.stat().st_size if part.is_file() else 0
            if have > w.size:
                part.unlink()
                have = 0
            sha = hashlib.sha256() if SHA256.match(w.etag) else None
            if sha is not None and have:
                _hash_prefix(part, sha)
            with open(part, "ab") as fh:
                sink = _Sink(fh, sha, on_bytes, cancel, have)
                if have < w.size:
                    try:
                        http_get(w.url, sink, resume_size=have, headers=_headers(w), expected_size=w.size,
                                 displayed_filename=w.name, tqdm_class=_Quiet)
                    except _Cancelled:
                        raise
                    except Exception as e:  # noqa: BLE001
                        if _network_error(e):
                            kept = part.stat().st_size if part.is_file() else 0
                            raise HubError(f"{at}: the download of {w.name} broke off ({type(e).__name__}: {e}); "
                                           f"the {_gb(kept)} received are kept in {part.parent}: run the same "
                                           "command again to resume") from None
                        raise _hub_error(e, src.repo, src.revision, w.name) from None
                sha = sink.sha
            got = part.stat().st_size
            if got != w.size:
                raise HubError(f"{at}: {w.name} came to {got} bytes, the hub says {w.size}; the partial download is "
                               f"kept in {part.parent}: run again to resume it")
            if sha is not None and sha.hexdigest() != w.etag:
                part.unlink()
                raise HubError(f"{at}: {w.name} downloaded, but its SHA-256 {sha.hexdigest()[:16]}... is not the "
                               f"{w.etag[:16]}... the hub states; the download was removed: run again")
            os.replace(part, blob)
    _link_blob(blob, pointer)


def _download(src: Source, items: Sequence[Weight], progress: ProgressFn | None) -> int:
    """Fetch ``items`` on up to :data:`PARALLEL` threads, reporting bytes from this thread.
    An interruption (Ctrl-C) keeps the partial files for the next run to resume."""
    total = sum(w.remaining for w in items)
    events: queue.Queue = queue.Queue()
    work: queue.Queue = queue.Queue()
    for w in sorted(items, key=lambda w: -w.remaining):
        work.put(w)
    cancel = threading.Event()
    failures: list[BaseException] = []

    def worker() -> None:
        while not cancel.is_set():
            try:
                w = work.get_nowait()
            except queue.Empty:
                return
            try:
                _fetch_weight(src, w, lambda n, name=w.name: events.put((n, name)), cancel)
            except _Cancelled:
                return
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failures.append(e)
                cancel.set()
                return

    threads = [threading.Thread(target=worker, name=f"lora2gguf-download-{i}", daemon=True)
               for i in range(max(1, min(PARALLEL, len(items))))]
    done = 0
    if progress:
        progress("download", 0, total, f"{src.repo}: {len(items)} file(s), {_gb(total)}")
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads) or not events.empty():
            try:
                n, name = events.get(timeout=0.2)
            except queue.Empty:
                continue
            done += n
            if progress:
                progress("download", min(done, total), total, f"{src.repo}: {name}")
    except BaseException:
        cancel.set()  # the partial files stay for the next run
        raise
    if failures:
        raise failures[0]
    if progress:
        progress("download", total, total, f"{src.repo}: done")
    return done


# ------------------------------------------------------------------------------ base + adapters


@dataclass
class Inputs:
    """A base and its adapters, resolved. A context manager: leaving it removes any stand-in."""

    base: Source
    adapters: list[Source]

    @property
    def adapter(self) -> Source:
        return self.adapters[0]

    def record(self, adapter: Source | None = None) -> dict[str, Any]:
        return {"base": self.base.to_json(), "adapter": (adapter or self.adapter).to_json()}

    def close(self) -> None:
        for s in (self.base, *self.adapters):
            s.close()

    def __enter__(self) -> "Inputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_inputs(base: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]], *,
                base_revision: str | None = None, adapter_revision: str | None = None,
                progress: ProgressFn | None = None) -> Inputs:
    """Resolve the base and each adapter. Adapters are fetched at once (they are small); a base
    whose weights must be downloaded is left ``pending`` with its header-only stand-in as
    ``path`` (unless this filesystem cannot hold sparse files): run doctor on it, then
    ``inputs.base.fetch(progress)``."""
    b = resolve(base, BASE, revision=base_revision, progress=progress, weights=False)
    try:
        # one adapter: its revision must fit it; several: the revision applies to the hub ids
        ads = [resolve(a, ADAPTER, progress=progress,
                       revision=adapter_revision if len(adapters) == 1 or is_hub_id(a) else None)
               for a in adapters]
    except BaseException:
        b.close()
        raise
    return Inputs(b, ads)


def is_hub_id(spec: str | os.PathLike[str] | Source) -> bool:
    """True when ``spec`` names a hub repo rather than a local folder (see :func:`parse_spec`)."""
    if isinstance(spec, Source):
        return spec.is_hub
    return parse_spec(spec) is not None
