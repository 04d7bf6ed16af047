"""A full disk (issue 7), on a real small filesystem: a tmpfs mounted for the test (skipped, with
the reason, where mounting is not permitted). The disk fills up while a run is writing (another
program takes the space once the pre-checks have passed): the run fails with an OutputError that
says the bytes needed and free, leaves no temporary file, and leaves earlier finished outputs
untouched; once space is freed, a rerun resumes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lora2gguf import synth
from lora2gguf.api import build
from lora2gguf.errors import BlockedError, OutputError
from lora2gguf.runstate import LOCK_NAME, RunState

NAME = "d"
BF16 = f"{NAME}-BF16.gguf"
Q8 = f"{NAME}-Q8_0.gguf"
SIZE = "256m"  # room for the BF16 (~65 MB) and Q8_0 (~35 MB) files of synth.TINY, and doctor's margin


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Filler:
    """Takes all but `leave` bytes of the filesystem, the first time `stage` reports progress."""

    def __init__(self, folder: Path, stage: str, leave: int = 256 * 1024):
        self.path = folder / "someone-elses-file"
        self.stage = stage
        self.leave = leave
        self.filled = 0

    def __call__(self, stage: str, done: int, total: int, what: str) -> None:
        if stage == self.stage and not self.filled:
            # the run keeps writing on its own threads meanwhile: take what is free at the moment
            for _ in range(20):
                free = shutil.disk_usage(self.path.parent).free
                try:
                    with open(self.path, "wb") as f:
                        os.posix_fallocate(f.fileno(), 0, max(free - self.leave, 1))
                    self.filled = max(free - self.leave, 1)
                    return
                except OSError:
                    continue
            raise AssertionError("could not fill the disk")

    def remove(self) -> None:
        self.path.unlink()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _numbers(msg: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"(\d[\d,]*) (?:bytes|are free)", msg)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_base):
    return synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("diskfull_adapter") / "adapter")


def test_disk_full_during_quantize_then_during_build(tmpfs, tiny_base, adapter, tmp_path):
    out = tmpfs / "out"

    # 1. the disk fills up as llama.cpp starts writing the Q8_0 file
    fill = Filler(tmpfs, "quantize")
    with pytest.raises(OutputError) as info:
        build(tiny_base, adapter, out, name=NAME, quants=["Q8_0"], progress=fill, nthread=1)
    msg = str(info.value)
    assert fill.filled > 0
    assert str(out / Q8) in msg and "are free" in msg and "needs up to" in msg
    needed, free = _numbers(msg)[:2]
    assert needed == (out / BF16).stat().st_size and 0 <= free < 8 << 20
    assert not list(out.glob("*.partial")) and not (out / Q8).exists() and not (out / LOCK_NAME).exists()
    # the BF16 file finished before the disk filled: intact, and recorded as finished
    bf16_sha = sha(out / BF16)
    assert RunState.load(out).stages["build"].outputs[BF16]["sha256"] == bf16_sha

    # 2. some space is freed: enough for the Q8_0 file, not for the BF16 and Q8_0 files together.
    # The rerun resumes (the build is skipped; doctor counts the finished BF16 file as available)
    # and writes the Q8_0 file.
    fill.remove()
    leave = 60 << 20
    with open(fill.path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(tmpfs).free - leave)
    assert shutil.disk_usage(tmpfs).free < (out / BF16).stat().st_size + (40 << 20)  # both would not fit
    result = build(tiny_base, adapter, out, name=NAME, quants=["Q8_0"], nthread=1)
    assert result.record["resumed"] == ["build"]
    assert sha(out / BF16) == bf16_sha
    q8_sha = sha(out / Q8)
    fill.remove()

    # 3. a changed adapter needs a new build, and the disk fills up while its tensors are written
    changed = tmp_path / "adapter2"
    synth.make_adapter_numpy(tiny_base, changed, seed=7)
    fill = Filler(tmpfs, "build")
    with pytest.raises(OutputError) as info:
        build(tiny_base, changed, out, name=NAME, quants=["Q8_0"], progress=fill, nthread=1)
    msg = str(info.value)
    assert fill.filled > 0
    assert str(out / BF16) in msg and "No space left on device" in msg
    needed, free = _numbers(msg)[:2]
    assert needed > (out / BF16).stat().st_size // 2 and 0 <= free < needed
    # no temporary file; the earlier finished outputs are untouched
    assert not list(out.glob("*.partial")) and not (out / LOCK_NAME).exists()
    assert sha(out / BF16) == bf16_sha and sha(out / Q8) == q8_sha
    fill.remove()


def test_not_enough_space_before_starting(tmpfs, tiny_base, adapter):
    """Less free space than the build needs: refused before a byte is written, with the numbers."""
    big = tmpfs / "someone-elses-file"
    with open(big, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(tmpfs).free - (8 << 20))
    out = tmpfs / "out"
    with pytest.raises(BlockedError) as info:
        build(tiny_base, adapter, out, name=NAME)
    msg = str(info.value)
    assert "[DISK_SPACE]" in msg and re.search(rf"{re.escape(str(out))}: [\d.]+ [kMG]B free, the outputs need ~[\d.]+ [kMG]B", msg), msg
    assert sorted(p.name for p in out.iterdir()) == []
    # accepting the finding does not make the space: the build's own check refuses, with the numbers
    with pytest.raises(OutputError) as info:
        build(tiny_base, adapter, out, name=NAME, accept=["DISK_SPACE"])
    msg = str(info.value)
    needed, free = _numbers(msg)[:2]
    assert str(out) in msg and free < needed and free <= 8 << 20
    assert sorted(p.name for p in out.iterdir()) == []
