"""Writing GGUF files: gguf-py writes the header, metadata and tensor infos; tensor data is then
filled in slab by slab at the offsets gguf-py's layout implies, streamed in file order in
large writes and hashed on the way (seqwrite). With ``background``, the header is packed on a
thread while the caller's merge workers start.

A file is written under a temporary name in the output folder and renamed into place only when
complete and readable by gguf-py, so a file with the final name is always a finished one.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .errors import FormatError, OutputError
from .gguf_header import read_header, tensor_types as header_tensor_types
from .gguf_kv import FastKVWriter
from .plan import OutTensor
from .seqwrite import SequentialWriter

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _np_dtype(qtype: gguf.GGMLQuantizationType) -> np.dtype:
    return {
        gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
        gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
        gguf.GGMLQuantizationType.BF16: np.dtype(np.uint16),
    }.get(qtype, np.dtype(np.uint8))


class GGUFStream:
    """One GGUF file: metadata first, then tensor data by (name, byte offset within the tensor)."""

    def __init__(self, path: Path, arch_name: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                 tensors: list[OutTensor], *, background: bool = False):
        """``background``: the header (metadata, tensor infos; a large vocabulary takes most of a
        second to pack) is written on a thread, and the first :meth:`write` waits for it, so that
        the caller's merge workers start at once; an error from ``add_metadata`` is raised by that
        first call (or by :meth:`finish` / :meth:`ready`), and leaves no file behind."""
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.tensors = {t.name: t for t in tensors}
        self.sha256: str | None = None  # set by finish()
        self._out: SequentialWriter | None = None
        self._fd: int | None = None
        self._prep_error: BaseException | None = None
        self._prep: threading.Thread | None = None
        if background:
            self._prep = threading.Thread(target=self._prepare_caught, args=(arch_name, add_metadata, tensors),
                                          name="lora2gguf-gguf-header", daemon=True)
            self._prep.start()
        else:
            self._prepare(arch_name, add_metadata, tensors)

    def _prepare_caught(self, arch_name, add_metadata, tensors) -> None:
        try:
            self._prepare(arch_name, add_metadata, tensors)
        except BaseException as e:  # noqa: BLE001 - raised by ready()
            self._prep_error = e

    def ready(self) -> None:
        """Wait for the header (written on a thread with ``background``); raise what stopped it."""
        if self._prep is not None:
            self._prep.join()
            self._prep = None
        if self._prep_error is not None:
            raise self._prep_error

    def _prepare(self, arch_name: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                 tensors: list[OutTensor]) -> None:
        try:
            writer = FastKVWriter(self.tmp, arch_name)
            add_metadata(writer)
            for t in tensors:
                dt = _np_dtype(t.qtype)
                shape = t.shape if dt != np.uint8 else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                writer.add_tensor_info(t.name, shape, dt, t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            pos = fout.tell()
            align = writer.data_alignment
            self.data_start = gguf.GGUFWriter.ggml_pad(pos, align)
            fout.write(b"\0" * (self.data_start - pos))
            writer.close()
        except OSError as e:
            self._discard()
            raise OutputError(f"{self.tmp}: cannot write ({e.strerror})") from None
        except BaseException:  # a bad metadata value (or an interrupt): leave no partial file behind
            self._discard()
            raise
        self.offsets: dict[str, int] = {}
        gaps = []
        off = 0
        for t in tensors:
            self.offsets[t.name] = off
            padded = gguf.GGUFWriter.ggml_pad(t.nbytes, align)
            gaps.append((self.data_start + off + t.nbytes, self.data_start + off + padded))  # alignment padding
            off += padded
        self.size = self.data_start + off
        self._fd = os.open(self.tmp, os.O_RDWR)
        self._out = SequentialWriter(self.tmp, self._fd, self.size)
        self._out.in_file(0, self.data_start)  # header, metadata, tensor infos: written by gguf-py
        for start, end in gaps:
            self._out.zeros(start, end)
        self.bytes_written = self.data_start
        # the header read back from the file while the tensors stream (finish() waits for it): a
        # 200k-token vocabulary takes ~0.7 s to walk, time the disk-bound stream hides
        self._header: dict = {}
        self._header_check = threading.Thread(target=self._read_back, name="lora2gguf-header", daemon=True)
        self._header_check.start()

    def _read_back(self) -> None:
        try:
            header = read_header(self.tmp, file_size=self.size)
            self._header["types"] = {n: t.qtype.name for n, t in header.tensors.items()}
        except BaseException as e:  # noqa: BLE001 - raised by finish()
            self._header["error"] = e

    @property
    def header_types(self) -> dict[str, str]:
        """GGUF tensor name -> ggml type name, as the written header reads back (after finish())."""
        return self._header["types"]

    def write(self, name: str, data: np.ndarray, byte_offset: int = 0, *, borrow: bool = False) -> None:
        """``borrow``: ``data`` is never changed afterwards, so it may be written from where it is
        (:meth:`SequentialWriter.write`)."""
        self.ready()
        t = self.tensors[name]
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if byte_offset + buf.nbytes > t.nbytes:
            raise ValueError(f"{name}: write of {buf.nbytes} bytes at {byte_offset} past the tensor's {t.nbytes}")
        pos = self.data_start + self.offsets[name] + byte_offset
        try:
            self._out.write(pos, buf, borrow=borrow)
        except OSError as e:
            self._discard()
            raise OutputError(
                f"{self.path}: write failed ({e.strerror}); the file needs {self.size:,} bytes and "
                f"{_free_bytes(self.path.parent):,} are free (after removing the unfinished file). "
                "Nothing was left behind; free space (or choose another -o folder) and run again."
            ) from None
        self.bytes_written += buf.nbytes

    def finish(self) -> Path:
        """Pad, sync, check the header read back, and rename into place; `sha256` is the file's hash."""
        self.ready()
        try:
            self.sha256 = self._out.close()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self._header_check.join()
            self._check_read_back()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._discard()
            raise OutputError(f"{self.path}: could not finish the file ({e.strerror}); it needs {self.size:,} bytes "
                              f"and {_free_bytes(self.path.parent):,} are free. The unfinished file was removed.") from None
        return self.path

    def _check_read_back(self) -> None:
        """The header, read back from the file, has the tensors this stream wrote, and the file
        the size the header describes; else the unfinished file is removed and the error raised."""
        err = self._header.get("error")
        if isinstance(err, FormatError):
            err = OutputError(f"{self.tmp}: the written GGUF does not read back ({err})")
        elif err is None:
            size, n = self.tmp.stat().st_size, len(self._header["types"])
            if size != self.size:
                err = OutputError(f"{self.tmp}: {size:,} bytes written, the header describes {self.size:,}")
            elif n != len(self.tensors):
                err = OutputError(f"{self.tmp}: reads back {n} tensors, expected {len(self.tensors)}")
        if err is not None:
            self._discard()
            raise err

    def _discard(self) -> None:
        if getattr(self, "_out", None) is not None:
            self._out.abort()
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def abort(self) -> None:
        if self._prep is not None:  # the header thread removes its own file when it fails
            self._prep.join()
            self._prep = None
        self._discard()


def _free_bytes(folder: Path) -> int:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, read back from a file (header only)."""
    return header_tensor_types(path)
