"""seqwrite.SequentialWriter: pieces written in any order become the right file, hashed right,
whether the chunks go out with O_DIRECT, through the page cache with early writeback, or plainly
through the page cache (real files, real threads)."""

from __future__ import annotations

import hashlib
import os
import random
import sys

import pytest

from lora2gguf.seqwrite import BLOCK, SequentialWriter

CHUNK = 4 * BLOCK  # small chunks: many chunk boundaries in a small file


def _layout(rng: random.Random, size: int, header: int) -> tuple[bytes, list[tuple[int, int]], list[tuple[int, int]]]:
    """Expected file bytes, the data ranges (to be written) and the zero ranges (padding)."""
    data, zeros = [], []
    pos = header
    while pos < size:
        n = min(size - pos, rng.choice([1, 7, 31, BLOCK - 3, BLOCK, CHUNK + 5, 3 * CHUNK]))
        data.append((pos, pos + n))
        pos += n
        pad = min(size - pos, rng.choice([0, 0, 5, 31]))
        if pad:
            zeros.append((pos, pos + pad))
            pos += pad
    expected = bytearray(size)
    expected[:header] = rng.randbytes(header)
    for a, b in data:
        expected[a:b] = rng.randbytes(b - a)
    return bytes(expected), data, zeros


@pytest.mark.parametrize("mode", ["writeback", "direct", "buffered"])
@pytest.mark.parametrize("seed", range(6))
def test_any_write_order_gives_the_file_and_its_sha256(tmp_path, seed, mode):
    rng = random.Random(seed)
    size = rng.choice([1, BLOCK, 5 * CHUNK + 123, 11 * CHUNK])
    header = min(size, rng.choice([0, 1, 100, BLOCK + 9]))
    expected, data, zeros = _layout(rng, size, header)
    path = tmp_path / "f.bin"
    path.write_bytes(expected[:header])  # someone else wrote the header, through the page cache
    fd = os.open(path, os.O_RDWR)
    w = SequentialWriter(path, fd, size, mode=mode, chunk=CHUNK)
    w.in_file(0, header)
    for a, b in zeros:
        w.zeros(a, b)
    order = list(data)
    if seed % 2:  # mostly in order, with some pieces ahead of the frontier (a split tensor's halves)
        for _ in range(len(order) // 3):
            i, j = rng.randrange(len(order)), rng.randrange(len(order))
            order[i], order[j] = order[j], order[i]
    for a, b in order:  # half of them lent (written from where they are where the mode allows)
        w.write(a, memoryview(expected)[a:b], borrow=rng.random() < 0.5)
    digest = w.close()
    os.close(fd)
    got = path.read_bytes()
    assert got == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    if mode != "direct":
        assert w.direct_bytes == 0


def test_in_order_stream_goes_out_with_o_direct_where_the_filesystem_takes_it(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        probe = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        pytest.skip(f"{tmp_path}: this filesystem refuses O_DIRECT")
    os.close(probe)
    size = 3 * CHUNK + 10
    payload = os.urandom(size)
    w = SequentialWriter(path, fd, size, mode="direct", chunk=CHUNK)
    w.write(0, payload)
    assert w.close() == hashlib.sha256(payload).hexdigest()
    os.close(fd)
    assert path.read_bytes() == payload
    assert w.direct_bytes == size and w.buffered_bytes == 0


def test_a_byte_range_written_twice_is_refused(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    w = SequentialWriter(path, fd, 100, chunk=CHUNK)
    w.write(0, b"x" * 10)
    with pytest.raises(ValueError, match="already streamed"):
        w.write(5, b"y")
    w.write(50, b"z" * 10)
    with pytest.raises(ValueError, match="two writes at 50"):
        w.write(50, b"z" * 10)
    w.abort()
    os.close(fd)


def test_a_range_never_written_reads_as_zeros(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    w = SequentialWriter(path, fd, 2 * BLOCK, chunk=CHUNK)
    w.write(0, b"a" * 10)
    w.write(BLOCK, b"b" * 10)
    digest = w.close()
    os.close(fd)
    expected = b"a" * 10 + bytes(BLOCK - 10) + b"b" * 10 + bytes(BLOCK - 10)
    assert path.read_bytes() == expected and digest == hashlib.sha256(expected).hexdigest()


def test_chunk_size_must_be_a_multiple_of_the_block(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        SequentialWriter(tmp_path / "f", -1, 10, chunk=BLOCK + 1)


def test_the_write_mode_is_writeback_on_linux_and_chosen_by_the_environment(tmp_path, monkeypatch):
    from lora2gguf import seqwrite
    from lora2gguf.errors import InputError

    monkeypatch.delenv("LORA2GGUF_WRITE", raising=False)
    assert seqwrite.default_mode() == "writeback"
    path = tmp_path / "default.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    w = SequentialWriter(path, fd, 0, chunk=CHUNK)
    w.close()
    os.close(fd)
    if sys.platform.startswith("linux"):  # glibc and musl both have sync_file_range
        assert w.mode == "writeback"
    else:
        assert w.mode == "direct"
    monkeypatch.setenv("LORA2GGUF_WRITE", "Buffered")
    assert seqwrite.default_mode() == "buffered"
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    w = SequentialWriter(path, fd, 10, chunk=CHUNK)
    assert w.mode == "buffered"
    w.write(0, b"0123456789")
    w.close()
    os.close(fd)
    monkeypatch.setenv("LORA2GGUF_WRITE", "fast")
    with pytest.raises(InputError, match="LORA2GGUF_WRITE='fast'.*writeback, direct, buffered"):
        seqwrite.default_mode()
