"""A stand-in for the Hugging Face Hub's file endpoints on 127.0.0.1, for the real huggingface_hub
client (``HF_ENDPOINT`` pointed at it). It serves what huggingface_hub asks for, as its source
says the hub answers:

- ``GET /api/models/{repo}[/revision/{rev}]`` (``HfApi.model_info``): ``sha``, and ``siblings``
  with ``rfilename``, ``size``, ``blobId`` and, for weights, ``lfs`` (``sha256``, ``size``);
- ``GET /api/models/{repo}/tree/{rev}`` (``HfApi.list_repo_tree``, which snapshot_download uses);
- ``HEAD /{repo}/resolve/{rev}/{file}`` (``get_hf_file_metadata``): ``X-Repo-Commit``, ``ETag``
  (the git blob id of a small file, the SHA-256 of an LFS file, as the hub gives them),
  ``Content-Length``, ``Accept-Ranges``;
- ``GET`` of the same, with ``Range: bytes=a-b`` / ``bytes=a-`` answered ``206`` with
  ``Content-Range``;
- errors with the hub's ``X-Error-Code`` header, which huggingface_hub turns into its typed
  errors: ``RepoNotFound`` (404, or 401 for a private repo without the token), ``GatedRepo``
  (403 on a gated repo's files without the token), ``RevisionNotFound`` (404), ``EntryNotFound``.

Every request is logged (method, path, Range, status, bytes sent). ``stall`` makes one file's
first full GET stop after some bytes until released (an interruption in the middle of a
download). The server serves a bounded number of requests and stops by itself after
``lifetime`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class RepoFile:
    name: str
    source: Path | bytes

    def data(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else Path(self.source).read_bytes()

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else Path(self.source).stat().st_size

    @property
    def lfs(self) -> bool:
        return self.name.endswith(LFS_SUFFIXES)


@dataclass
class Repo:
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    etags: dict[tuple[str, str], str] = field(default_factory=dict)

    def etag(self, commit: str, f: RepoFile) -> str:
        key = (commit, f.name)
        if key not in self.etags:
            data = f.data()
            if f.lfs:
                self.etags[key] = hashlib.sha256(data).hexdigest()
            else:  # a git blob id, as the hub gives small files
                self.etags[key] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return self.etags[key]


class FakeHub:
    def __init__(self, *, lifetime: float = 900.0, max_requests: int = 5000, token: str = "hf_test_token"):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.token = token
        self.lifetime = lifetime
        self.max_requests = max_requests
        self.stall: dict | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- content

    def add(self, repo_id: str, files: dict[str, Path | bytes], *, branch: str = "main", gated: bool = False,
            private: bool = False) -> str:
        """Add a commit with ``files`` on ``branch``; returns the commit hash."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, gated=gated, private=private))
        listing = {n: RepoFile(n, src) for n, src in files.items()}
        digest = hashlib.sha1(json.dumps([repo_id, branch, len(repo.commits),
                                          sorted((n, f.size) for n, f in listing.items())]).encode()).hexdigest()
        repo.commits[digest] = listing
        repo.refs[branch] = digest
        return digest

    def stall_file(self, name: str, after: int) -> tuple[threading.Event, threading.Event]:
        """The next full GET of ``name`` sends ``after`` bytes, sets the first event and waits for the
        second (at most 600 s: a test sets it when it is done, whatever happened), then drops the
        connection."""
        reached, release = threading.Event(), threading.Event()
        self.stall = {"name": name, "after": after, "reached": reached, "release": release}
        return reached, release

    # --- queries for tests

    def requests(self, method: str | None = None, repo: str | None = None) -> list[dict]:
        with self._lock:
            rows = list(self.log)
        return [r for r in rows if (method is None or r["method"] == method) and (repo is None or r["repo"] == repo)]

    def fetched(self, repo: str) -> dict[str, int]:
        """File name -> body bytes sent by GETs of ``/resolve/`` for ``repo``."""
        out: dict[str, int] = {}
        for r in self.requests("GET", repo):
            if r.get("file"):
                out[r["file"]] = out.get(r["file"], 0) + r["sent"]
        return out

    # --- server

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.timeout = 0.25
        deadline = time.monotonic() + self.lifetime
        self._stop = threading.Event()

        def loop() -> None:
            served = 0
            while not self._stop.is_set() and time.monotonic() < deadline and served < self.max_requests:
                self._server.handle_request()
                served += 1
            self._server.server_close()

        self._thread = threading.Thread(target=loop, name="fake-hub", daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is None:
            return
        self._stop.set()
        if self.stall:
            self.stall["release"].set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _record(self, repo: str | None, file: str | None, status: int, sent: int) -> None:
        with self.hub._lock:
            self.hub.log.append({"method": self.command, "path": self.path, "repo": repo, "file": file,
                                 "range": self.headers.get("Range"), "status": status, "sent": sent,
                                 "auth": bool(self.headers.get("Authorization"))})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _error(self, status: int, code: str | None, repo: str | None, file: str | None = None,
               commit: str | None = None) -> None:
        body = json.dumps({"error": code or "error"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(repo, file, status, 0)

    def _find(self, repo_id: str, rev: str) -> tuple[Repo | None, str | None]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return None, None
        rev = unquote(rev)
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        return repo, commit

    def do_GET(self) -> None:  # noqa: N802
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", path)
        if m and self.command == "GET":
            return self._model_info(m.group(1), m.group(2) or "main")
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$", path)
        if m and self.command == "GET":
            return self._tree(m.group(1), m.group(2))
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(m.group(1), m.group(2), unquote(m.group(3)))
        self._error(404, None, None)

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo, commit = self._find(repo_id, rev)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(401 if repo is None or repo.private else 404, "RepoNotFound", repo_id)
        if commit is None:
            return self._error(404, "RevisionNotFound", repo_id)
        siblings = []
        for f in repo.commits[commit].values():
            s = {"rfilename": f.name, "size": f.size, "blobId": hashlib.sha1(f.name.encode()).hexdigest()}
            if f.lfs:
                s["lfs"] = {"sha256": repo.etag(commit, f), "size": f.size, "pointerSize": 134}
            siblings.append(s)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                           "gated": "auto" if repo.gated else False, "disabled": False,
                           "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._record(repo_id, None, 200, 0)

    def _tree(self, repo_id: str, rev: str) -> None:
        """``HfApi.list_repo_tree`` (``recursive=true``; snapshot_download lists a commit with it)."""
        repo, commit = self._find(repo_id, rev)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(401 if repo is None or repo.private else 404, "RepoNotFound", repo_id)
        if commit is None:
            return self._error(404, "RevisionNotFound", repo_id)
        entries, folders = [], set()
        for f in repo.commits[commit].values():
            parts = f.name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            e = {"type": "file", "path": f.name, "size": f.size, "oid": hashlib.sha1(f.name.encode()).hexdigest()}
            if f.lfs:
                e["lfs"] = {"oid": repo.etag(commit, f), "size": f.size, "pointerSize": 134}
            entries.append(e)
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in folders]
        body = json.dumps(entries).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._record(repo_id, None, 200, 0)

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        repo, commit = self._find(repo_id, rev)
        if repo is None or (repo.private and not self._authorized()):
            return self._error(401 if repo is None or repo.private else 404, "RepoNotFound", repo_id, name)
        if commit is None:
            return self._error(404, "RevisionNotFound", repo_id, name)
        if repo.gated and not self._authorized():
            return self._error(403 if self.headers.get("Authorization") else 401, "GatedRepo", repo_id, name)
        f = repo.commits[commit].get(name)
        if f is None:
            return self._error(404, "EntryNotFound", repo_id, name, commit)
        data = f.data()
        size = len(data)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            rm = re.match(r"^bytes=(\d+)-(\d*)$", rng.strip())
            if rm:
                start = int(rm.group(1))
                end = min(int(rm.group(2)), size - 1) if rm.group(2) else size - 1
                status = 206
                if start >= size:
                    return self._error(416, None, repo_id, name)
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{repo.etag(commit, f)}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if self.command == "GET" else size))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return self._record(repo_id, name, status, 0)
        stall = self.hub.stall
        if stall and stall["name"] == name and status == 200 and not stall["reached"].is_set():
            cut = stall["after"]
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self._record(repo_id, name, status, cut)
            stall["reached"].set()
            stall["release"].wait(600)
            self.close_connection = True
            return
        sent = 0
        view = memoryview(body)
        try:
            for i in range(0, len(view), 1 << 20):
                self.wfile.write(view[i:i + (1 << 20)])
                sent += len(view[i:i + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        self._record(repo_id, name, status, sent)
