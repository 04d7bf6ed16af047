"""Positioned writes turned into one sequential stream of large, aligned writes, hashed on the way.

The stream writer fills a file of known size from pieces (offset, bytes). Pieces that arrive at
the frontier (the first byte not yet streamed; the common case, since a plan writes its tensors
in file order) are copied into page-aligned chunk buffers; a full chunk is hashed (SHA-256) on
one thread and written by two others (two writes in flight). A piece that arrives ahead of the
frontier is written at once through the page cache and streamed again (read back) when the
frontier reaches it, so the hash and the chunk writes still see the file in order. A piece the
caller lends (``borrow``: bits that never change, such as a mapped source tensor) is hashed and
written from where it is, without the copy into a chunk buffer, where the mode allows.

How a chunk reaches the disk (``mode``; the file is the same in each):

- ``writeback`` (the default where the system has ``sync_file_range``, i.e. Linux): through the
  page cache, as ``cp`` writes, but the disk is asked to start writing each chunk at once
  (``SYNC_FILE_RANGE_WRITE``), and a chunk ``LAG`` chunks behind is waited for and dropped from
  the cache. The kernel keeps many requests in flight, the final fsync finds little left to do,
  and the page cache holds at most ~``LAG`` chunks of the file (a 40 GB output does not push the
  user's files out of memory).
- ``direct``: O_DIRECT, the buffer handed to the device (no copy into the page cache, ~0.1
  CPU s per GB instead of ~0.7), but one request per writer in flight.
- ``buffered``: plain writes; the kernel writes back when it likes and the final fsync waits.

Why writeback: on the virtual disk measured (2026-12-08, 2.5 GB from memory, fsync'ed), the
same data took 4.1-5.0 s in writeback mode, 6.5-7.6 s direct with two writers and 9.7 s
buffered; ``cp`` of a 2.5 GB file took 4.6-5.6 s. O_DIRECT had been the faster one on the day
before (620-720 MB/s): the disk's behaviour with few large requests varies, while writeback
behaves as ``cp`` does. Where O_DIRECT is refused (tmpfs, some network filesystems) the direct
mode falls back to the page cache; without ``sync_file_range`` (macOS, Windows) the default is
direct. ``LORA2GGUF_WRITE=direct|writeback|buffered`` chooses (benchmarks compare them).

Also tried (2026-12-08): the merged chunks O_DIRECT and only the lent copies through the page
cache, to save the CPU of the copy into the cache where the merge keeps both cores busy. The
one-layer MoE build of bench/README.md took 11.3-12.1 s that way against 10.1-10.4 s all
through the page cache: the direct writes were slower than the CPU they saved.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import queue
import threading

BLOCK = 4096  # alignment of direct writes: offsets, lengths and buffer addresses
CHUNK = 32 * 1024 * 1024  # bytes per write (a multiple of BLOCK)
WRITERS = 2  # writing threads: writes in flight
BUFFERS = 6  # chunk buffers: one being filled, one being hashed, the writers' and spares (192 MB)
LAG = 4  # writeback mode: chunks written but not yet waited for (and kept in the page cache)
MODES = ("writeback", "direct", "buffered")

# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _load_sync_file_range():
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def default_mode() -> str:
    """``LORA2GGUF_WRITE`` if set, else writeback (direct where the system has no
    sync_file_range: SequentialWriter falls back)."""
    mode = os.environ.get("LORA2GGUF_WRITE", "").strip().lower()
    if mode and mode not in MODES:
        from .errors import InputError

        raise InputError(f"LORA2GGUF_WRITE={mode!r}: expected one of {', '.join(MODES)}")
    return mode or "writeback"


class SequentialWriter:
    """Streams `size` bytes into `path` (already open as `fd`, read-write).

    `write(pos, data)` for every byte range of the file (each once); `in_file(start, end)` for
    ranges already in the file (a header written by someone else); `zeros(start, end)` for
    ranges nobody writes (padding). `close()` returns the SHA-256 of the file's bytes.
    """

    def __init__(self, path: os.PathLike | str, fd: int, size: int, *, mode: str | None = None, chunk: int = CHUNK):
        if chunk <= 0 or chunk % BLOCK:
            raise ValueError(f"chunk size {chunk} is not a positive multiple of {BLOCK}")
        mode = mode or default_mode()
        if mode not in MODES:
            raise ValueError(f"write mode {mode!r}: expected one of {MODES}")
        if mode == "writeback" and _sync_file_range is None:
            mode = "direct"
        self.mode = mode
        self.fd = fd
        self.chunk = chunk
        self.size = size
        self.frontier = 0  # bytes [0, frontier) are streamed (hashed, and written or queued)
        self.pending: dict[int, tuple[int, bool]] = {}  # start -> (end, zeros) ahead of the frontier
        self.error: BaseException | None = None  # from the writing thread, raised in the caller's
        self._stopping = False
        self.dfd = _open_direct(path) if mode == "direct" else None
        self.direct_bytes = 0  # streamed with O_DIRECT
        self.buffered_bytes = 0  # streamed through the page cache (pieces written ahead not counted)
        self._in_writeback: collections.deque = collections.deque()  # (pos, n) asked to be written, not waited for
        self._sha = hashlib.sha256()
        self._lock = threading.Lock()  # the byte counters and the O_DIRECT fallback
        self._free: queue.Queue = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, chunk))  # anonymous maps are page-aligned
        self._to_hash: queue.Queue = queue.Queue()
        self._to_write: queue.Queue = queue.Queue()
        self._buf: mmap.mmap | None = None
        self._fill = 0
        self._chunk_pos = 0  # file offset of the current buffer's first byte
        self._threads = [threading.Thread(target=self._hash_loop, name="lora2gguf-sha256", daemon=True)]
        self._threads += [threading.Thread(target=self._write_loop, name=f"lora2gguf-write_{i}", daemon=True)
                          for i in range(WRITERS)]
        for t in self._threads:
            t.start()

    # -- the caller's side --------------------------------------------------------------------

    def write(self, pos: int, data, *, borrow: bool = False) -> None:
        """`data` belongs at file offset `pos`; it is copied (or written) before this returns,
        unless `borrow`: the caller promises never to change `data` (a mapped source tensor, an
        array nobody reuses), which is then hashed and written from where it is, without the copy
        into a chunk buffer, when it arrives at the frontier and the chunks go through the page
        cache (direct writes need aligned buffers: there it is copied as usual)."""
        self._raise_error()
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        if pos < self.frontier:
            raise ValueError(f"write at {pos}: bytes up to {self.frontier} are already streamed")
        if pos > self.frontier:  # ahead: into the file now, streamed again when the frontier gets here
            _pwrite_all(self.fd, mv, pos)
            self._add_pending(pos, pos + n, False)
            return
        if borrow and self.mode != "direct" and n >= BLOCK:
            self._lend(mv)
        else:
            self._append(mv)
        self._catch_up()

    def in_file(self, start: int, end: int) -> None:
        if end > start:
            self._add_pending(start, end, False)
            self._catch_up()

    def zeros(self, start: int, end: int) -> None:
        if end > start:
            self._add_pending(start, end, True)
            self._catch_up()

    def close(self) -> str:
        """Stream what is left (ranges never written read as zeros), wait for the writes, set
        the file's length and return its SHA-256. The file is not fsync'ed here."""
        try:
            if self.frontier < self.size:
                self._add_pending(self.frontier, self.size, False)
                self._catch_up()
            if self._fill:
                self._submit()
        finally:
            self._stop()
        self._raise_error()
        os.ftruncate(self.fd, self.size)  # direct writes end on a block boundary
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Stop without writing what is queued."""
        self._stopping = True
        self._stop()

    # -- streaming ------------------------------------------------------------------------------

    def _add_pending(self, start: int, end: int, zeros: bool) -> None:
        prev = self.pending.get(start)
        if prev is not None:
            raise ValueError(f"two writes at {start}")
        self.pending[start] = (end, zeros)

    def _catch_up(self) -> None:
        while self.frontier in self.pending:
            end, zeros = self.pending.pop(self.frontier)
            while self.frontier < end:
                k = min(self.chunk, end - self.frontier)
                self._append(memoryview(bytes(k)) if zeros else memoryview(_pread_all(self.fd, k, self.frontier)))

    def _append(self, mv: memoryview) -> None:
        while len(mv):
            if self._buf is None:
                self._buf = self._take_free()
                self._chunk_pos = self.frontier - self._fill
            k = min(self.chunk - self._fill, len(mv))
            self._buf[self._fill:self._fill + k] = mv[:k]
            self._fill += k
            self.frontier += k
            mv = mv[k:]
            if self._fill == self.chunk:
                self._submit()

    def _lend(self, mv: memoryview) -> None:
        """Queue `mv` itself, in chunks; each holds a free buffer (unused) while it is in flight,
        so borrowed and copied chunks share one limit on what is queued."""
        if self._fill:
            self._submit()  # the partial chunk before it (page-cache writes need no alignment)
        while len(mv):
            k = min(self.chunk, len(mv))
            self._to_hash.put((self._take_free(), self.frontier, k, mv[:k]))
            self.frontier += k
            mv = mv[k:]

    def _take_free(self) -> mmap.mmap:
        while True:
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                self._raise_error()

    def _submit(self) -> None:
        self._to_hash.put((self._buf, self._chunk_pos, self._fill, None))
        self._buf, self._fill = None, 0

    def _hash_loop(self) -> None:
        while (item := self._to_hash.get()) is not None:
            buf, pos, n, lent = item
            if self.error is None and not self._stopping:
                self._sha.update(lent if lent is not None else memoryview(buf)[:n])
            self._to_write.put(item)
        for _ in range(WRITERS):
            self._to_write.put(None)

    def _write_loop(self) -> None:
        while (item := self._to_write.get()) is not None:
            buf, pos, n, lent = item
            if self.error is None and not self._stopping:
                try:
                    if lent is not None:
                        self._write_buffered(lent, pos, n)
                    else:
                        self._write_chunk(buf, pos, n)
                except BaseException as e:  # raised in the caller's thread by the next call
                    self.error = e
            self._free.put(buf)

    def _write_chunk(self, buf: mmap.mmap, pos: int, n: int) -> None:
        mv = memoryview(buf)
        dfd = self.dfd
        if dfd is not None and pos % BLOCK == 0:
            padded = -(-n // BLOCK) * BLOCK  # the tail beyond n is cut by close()'s ftruncate
            if padded > n:
                buf[n:padded] = bytes(padded - n)
            try:
                _pwrite_all(dfd, mv[:padded], pos)
                with self._lock:
                    self.direct_bytes += n
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                with self._lock:  # the filesystem takes O_DIRECT opens but not these writes
                    if self.dfd is not None:
                        os.close(self.dfd)
                        self.dfd = None
        self._write_buffered(mv[:n], pos, n)

    def _write_buffered(self, mv: memoryview, pos: int, n: int) -> None:
        _pwrite_all(self.fd, mv, pos)
        with self._lock:
            self.buffered_bytes += n
        if self.mode == "writeback":
            self._writeback(pos, n)

    def _writeback(self, pos: int, n: int) -> None:
        """Start the disk writing [pos, pos+n); wait for the range LAG chunks back and drop it
        from the page cache (written pages are clean, so dropping them loses nothing)."""
        _check_sfr(_sync_file_range(self.fd, pos, n, _WRITE))
        with self._lock:
            self._in_writeback.append((pos, n))
            old = self._in_writeback.popleft() if len(self._in_writeback) > LAG else None
        if old is not None:
            _check_sfr(_sync_file_range(self.fd, old[0], old[1], _WAIT_BEFORE | _WRITE | _WAIT_AFTER))
            os.posix_fadvise(self.fd, old[0], old[1], os.POSIX_FADV_DONTNEED)

    def _stop(self) -> None:
        if self._threads:
            self._to_hash.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
        if self.dfd is not None:
            os.close(self.dfd)
            self.dfd = None

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _check_sfr(rc: int) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _open_direct(path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _pwrite_all(fd: int, mv: memoryview, pos: int) -> None:
    while len(mv):
        n = os.pwrite(fd, mv, pos)
        mv = mv[n:]
        pos += n


def _pread_all(fd: int, n: int, pos: int) -> bytearray:
    out = bytearray(n)
    mv = memoryview(out)
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], pos + got)
        if k == 0:  # beyond the end of the file: zeros (close() sets the length)
            break
        got += k
    return out

