"""Kill and resume (issue 7): a build killed with SIGKILL in the middle of writing tensors, then
rerun, gives byte-identical files to an uninterrupted run; a rerun with nothing changed skips every
stage and changes nothing, confirming the outputs by their cheap fingerprint (issue 11: no full
hash); an output edited in the middle, truncated or replaced is redone; `verify --rehash` re-checks
every full SHA-256; a changed adapter file redoes the build; a second run on a folder that is being
written gets a clear error naming the other process. Plus the manifest's own rules
(runstate.RunState) on small files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora2gguf import runstate, synth
from lora2gguf.api import build
from lora2gguf.errors import OutputError
from lora2gguf.runstate import LOCK_NAME, STATE_NAME, RunLock, RunState, stage_key

NAME = "r"
BF16 = f"{NAME}-BF16.gguf"
Q8 = f"{NAME}-Q8_0.gguf"

# A build in a child process that kills itself with SIGKILL from inside the progress callback once
# half the bytes are merged (between two slab writes of the GGUF), or, for a quantize stage, from a
# thread as soon as llama.cpp's temporary output file has grown.
CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from lora2gguf.api import build

    base, adapter, out, mode = sys.argv[1:5]
    quants = sys.argv[5:]

    def die():
        sys.stdout.write("killing\\n"); sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def progress(stage, done, total, what):
        if mode == "build" and stage == "build" and total and done >= total // 2:
            die()
        if mode == "quantize" and stage == "quantize" and done == 0:
            partial = Path(out) / ("r-" + what + ".gguf.partial")
            def watch():
                while True:
                    if partial.exists() and partial.stat().st_size > 1 << 20:
                        die()
                    time.sleep(0.002)
            threading.Thread(target=watch, daemon=True).start()

    build(base, adapter, out, name="r", quants=quants, progress=progress)
    sys.stdout.write("finished\\n")
""")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_child(base: Path, adapter: Path, out: Path, mode: str, quants: list[str] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(adapter), str(out), mode, *quants],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert proc.stdout.strip().endswith("killing")
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_base):
    ad = synth.make_adapter_numpy(tiny_base, tmp_path_factory.mktemp("resume_adapter") / "adapter")
    return tiny_base, ad


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs):
    """An uninterrupted build (BF16) into a fresh folder."""
    out = tmp_path_factory.mktemp("resume_ref")
    result = build(*inputs, out, name=NAME)
    assert result.record["resumed"] == []
    return out


def test_kill_mid_build_then_resume_is_byte_identical(tmp_path, inputs, reference):
    out = tmp_path / "out"
    run_child(*inputs, out, "build")
    # killed in the middle of the tensor data: an unfinished temporary file, no finished one
    partial = out / (BF16 + ".partial")
    assert partial.is_file() and partial.stat().st_size > 1 << 20
    assert not (out / BF16).exists()
    assert "build" not in RunState.load(out).stages
    assert runstate.holder(out) is None  # the kernel dropped the dead process' lock

    result = build(*inputs, out, name=NAME)
    assert result.record["resumed"] == []
    assert result.record["removed_partials"] == [partial.name]
    assert not list(out.glob("*.partial")) and not (out / LOCK_NAME).exists()
    assert (out / BF16).read_bytes() == (reference / BF16).read_bytes()
    entry = RunState.load(out).stages["build"]
    assert entry.outputs[BF16]["sha256"] == sha(out / BF16) == result.outputs[0].sha256


def test_rerun_unchanged_skips_and_changes_nothing(inputs, reference):
    before = {p.name: (p.stat().st_mtime_ns, sha(p)) for p in reference.glob("*.gguf")}
    state_before = json.loads((reference / STATE_NAME).read_text())
    result = build(*inputs, reference, name=NAME)
    assert result.record["resumed"] == ["build"]
    assert result.record["stages"]["build"]["resumed"] is True
    # confirmed by size, times, inode and sampled bytes: the file was not read in full
    assert result.record["stages"]["build"]["confirmed"] == {BF16: "fingerprint"}
    after = {p.name: (p.stat().st_mtime_ns, sha(p)) for p in reference.glob("*.gguf")}
    assert after == before
    assert json.loads((reference / STATE_NAME).read_text()) == state_before
    assert result.outputs[0].sha256 == before[BF16][1]
    # run.json still describes the file, as the first run did
    rec = json.loads((reference / "run.json").read_text())
    assert rec["outputs"][0]["sha256"] == before[BF16][1] and rec["technical"]["eos_token"] == "<|return|>"


def test_changed_adapter_redoes_build(tmp_path, inputs, reference):
    base, adapter = inputs
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    changed = tmp_path / "adapter"
    shutil.copytree(adapter, changed)
    old_sha = sha(out / BF16)
    # same folder path recorded nowhere in the key: a copied adapter with the same bytes still resumes
    assert build(base, changed, out, name=NAME).record["resumed"] == ["build"]
    # now change the adapter's weights (same size, same shapes)
    (changed / "adapter_model.safetensors").unlink()
    synth.make_adapter_numpy(base, tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", changed / "adapter_model.safetensors")
    result = build(base, changed, out, name=NAME)
    assert result.record["resumed"] == []
    assert sha(out / BF16) != old_sha == sha(reference / BF16)
    assert RunState.load(out).stages["build"].outputs[BF16]["sha256"] == sha(out / BF16)


def test_edited_output_is_redone(tmp_path, inputs, reference):
    """An output whose bytes no longer match the manifest (edited, half-copied) is rebuilt."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with open(out / BF16, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\x01" * 10)
    assert RunState.load(out).done("build", RunState.load(out).stages["build"].key) is None
    result = build(*inputs, out, name=NAME)
    assert result.record["resumed"] == []
    assert (out / BF16).read_bytes() == (reference / BF16).read_bytes()


def test_kill_mid_quantize_then_resume(tmp_path, inputs, reference):
    """Killed while llama.cpp writes the Q8_0 file: the rerun skips the finished BF16 build and
    redoes the quantization; the file equals llama.cpp's quantization of the reference BF16."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    run_child(*inputs, out, "quantize", ["Q8_0"])
    assert (out / (Q8 + ".partial")).exists() and not (out / Q8).exists()
    result = build(*inputs, out, name=NAME, quants=["Q8_0"])
    assert result.record["resumed"] == ["build"]
    # the copied BF16 file has another inode: the killed run hashed it in full and refreshed its
    # fingerprint in the manifest before it died, so this run confirms it cheaply
    assert result.record["stages"]["build"]["confirmed"] == {BF16: "fingerprint"}
    assert result.record["removed_partials"] == [Q8 + ".partial"]
    ref_q8 = tmp_path / "ref-Q8_0.gguf"
    _llama_quantize(reference / BF16, ref_q8, "Q8_0")
    assert (out / Q8).read_bytes() == ref_q8.read_bytes()
    assert (out / BF16).read_bytes() == (reference / BF16).read_bytes()
    # and a rerun now skips both stages
    again = build(*inputs, out, name=NAME, quants=["Q8_0"])
    assert again.record["resumed"] == ["build", "quantize:Q8_0"]
    assert again.record["stages"]["build"]["confirmed"] == {BF16: "fingerprint"}
    assert again.record["stages"]["quantize"]["confirmed"] == {Q8: "fingerprint"}


def test_verify_stage_resumes(tmp_path, inputs, reference):
    """verify is a stage too: a rerun with the same outputs and options restores its section into
    run.json instead of running llama.cpp again; its report files stay as they were."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    opts = dict(reference="gguf", samples=0, max_tokens=4, speed=False)
    first = build(*inputs, out, name=NAME, verify=True, verify_options=opts)
    assert first.record["resumed"] == ["build"]
    assert "verify" in RunState.load(out).stages
    report = sha(first.verify.report_md)
    second = build(*inputs, out, name=NAME, verify=True, verify_options=opts)
    assert second.record["resumed"] == ["build", "verify"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["verify"] == first.record["verify"] == second.verify.section
    assert second.verify.passed == first.verify.passed and second.verify.failures == first.verify.failures
    assert sha(second.verify.report_md) == report


def _confirmed_copy(tmp_path: Path, reference: Path) -> tuple[Path, dict]:
    """A copy of the reference folder whose manifest holds the copy's own fingerprints: the first
    check hashes the copied file in full (another inode) and refreshes them; the next is cheap."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    key = RunState.load(out).stages["build"].key
    assert RunState.load(out).done("build", key).confirmed == {BF16: "sha256"}
    assert RunState.load(out).done("build", key).confirmed == {BF16: "fingerprint"}
    return out, key


def _unsampled_offset(size: int) -> int:
    """An offset in the middle of the largest stretch the fingerprint does not read."""
    ranges = runstate.fingerprint_ranges(size)
    gaps = [(a + n, b) for (a, n), (b, _) in zip(ranges, ranges[1:])]
    lo, hi = max(gaps, key=lambda g: g[1] - g[0])
    assert hi - lo > 1 << 20
    return (lo + hi) // 2


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("change", ["edited", "truncated", "replaced"])
def test_changed_output_is_redone_although_its_samples_match(tmp_path, inputs, reference, change):
    """Changes the fingerprint's sampled bytes do not see are still seen: an edited byte in the
    middle (the mtime and ctime change), a truncated file (the size), a file replaced by one of the
    same size and the same mtime (the inode and ctime). Each is redone, byte-identical again."""
    out, key = _confirmed_copy(tmp_path, reference)
    path = out / BF16
    size = path.stat().st_size
    off = _unsampled_offset(size)
    if change == "edited":
        _flip(path, off)
    elif change == "truncated":
        os.truncate(path, size - 4096)
    else:
        new = out / "replacement.tmp"
        shutil.copyfile(path, new)
        _flip(new, off)
        st = path.stat()
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(new, path)
        assert path.stat().st_size == size and path.stat().st_mtime_ns == st.st_mtime_ns
    fp = runstate.output_fingerprint(path)
    recorded = RunState.load(out).stages["build"].outputs[BF16]["fingerprint"]
    if change != "truncated":  # the sampled bytes are the same: only the metadata tells
        assert fp["sample_sha256"] == recorded["sample_sha256"]
    assert RunState.load(out).done("build", key) is None
    result = build(*inputs, out, name=NAME)
    assert result.record["resumed"] == []
    assert (out / BF16).read_bytes() == (reference / BF16).read_bytes()
    assert RunState.load(out).done("build", key).confirmed == {BF16: "fingerprint"}


def test_verify_rehash_rechecks_every_full_hash(tmp_path, inputs, reference, capsys):
    """`lora2gguf verify --rehash` hashes every output in full: unchanged, it records that each
    matched and verifies; after an edit it fails naming the file, and the next build redoes the
    stage (even if the file's fingerprint were to look unchanged)."""
    from lora2gguf.cli import main

    out, key = _confirmed_copy(tmp_path, reference)
    args = ["verify", str(out), "--rehash", "--reference", "gguf", "--samples", "0", "--max-tokens", "4",
            "--no-speed", "--verify-threads", "1"]
    assert main(args) == 0, capsys.readouterr()
    rehash = json.loads((out / "run.json").read_text())["verify"]["rehash"]
    assert [(r["file"], r["stage"], r["result"]) for r in rehash] == [(BF16, "build", "ok")]
    assert rehash[0]["sha256"] == rehash[0]["recorded"] == sha(out / BF16)
    capsys.readouterr()

    _flip(out / BF16, _unsampled_offset((out / BF16).stat().st_size))
    assert main(args) == 3
    err = capsys.readouterr().err
    assert str(out / BF16) in err and "changed after they were written" in err and "lora2gguf build" in err
    assert "build" not in RunState.load(out).stages
    result = build(*inputs, out, name=NAME)
    assert result.record["resumed"] == []
    assert (out / BF16).read_bytes() == (reference / BF16).read_bytes()


def _llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    """llama.cpp's quantizer called directly (the uninterrupted reference)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def test_second_run_on_a_locked_folder(tmp_path, inputs):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lora2gguf.runstate import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError) as info:
            build(*inputs, out, name=NAME)
        msg = str(info.value)
        assert str(out) in msg and f"pid {holder.pid}" in msg and "another lora2gguf run" in msg
        assert runstate.holder(out)["pid"] == holder.pid
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written by the refused run
    finally:
        holder.kill()
        holder.wait()
    assert runstate.holder(out) is None  # the lock died with its holder


# --------------------------------------------------------------------------- runstate on small files


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / LOCK_NAME).exists()
        assert runstate.holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists() and runstate.holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()  # free again


def test_manifest_rules(tmp_path):
    out = tmp_path
    f = out / "a.gguf"
    f.write_bytes(b"x" * 1000)
    key = stage_key({"in": 1}, {"type": "Q8_0"})
    RunState(out).record("quantize:Q8_0", key, {f: None}, {"note": "n"})
    st = RunState.load(out)
    entry = st.done("quantize:Q8_0", key)
    assert entry is not None and entry.outputs["a.gguf"]["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert entry.info == {"note": "n"} and entry.confirmed == {"a.gguf": "fingerprint"}
    assert entry.outputs["a.gguf"]["fingerprint"] == runstate.output_fingerprint(f)
    # touched (new mtime, same bytes): hashed in full, still done, the fingerprint refreshed on disk
    t = f.stat().st_mtime_ns + 10**9
    os.utime(f, ns=(t, t))
    assert st.done("quantize:Q8_0", key).confirmed == {"a.gguf": "sha256"}
    assert RunState.load(out).stages["quantize:Q8_0"].outputs["a.gguf"]["fingerprint"]["mtime_ns"] == t
    assert RunState.load(out).done("quantize:Q8_0", key).confirmed == {"a.gguf": "fingerprint"}
    assert st.done("quantize:Q8_0", key, check_hashes=False).confirmed == {"a.gguf": "size"}
    assert st.done("quantize:Q8_0", stage_key({"in": 2}, {"type": "Q8_0"})) is None  # inputs changed
    assert st.done("quantize:Q8_0", stage_key({"in": 1}, {"type": "Q4_0"})) is None  # options changed
    assert st.done("quantize:Q4_0", key) is None  # never ran
    f.write_bytes(b"y" * 1000)  # same size, other bytes
    assert st.done("quantize:Q8_0", key) is None
    f.unlink()
    assert st.done("quantize:Q8_0", key) is None
    # an unreadable manifest means "redo everything", never an error
    (out / STATE_NAME).write_text("{not json")
    assert RunState.load(out).stages == {}


def test_remove_partials_and_fingerprints(tmp_path):
    (tmp_path / "x.gguf.partial").write_bytes(b"1")
    (tmp_path / "run.json.partial").write_bytes(b"1")
    (tmp_path / "keep.gguf").write_bytes(b"1")
    removed = runstate.remove_partials(tmp_path)
    assert sorted(p.name for p in removed) == ["run.json.partial", "x.gguf.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)
    (d / "README.md").write_text("ignored")
    small = runstate.folder_fingerprint(d)
    assert sorted(small) == ["config.json", "model.safetensors"] and "sha256" in small["config.json"]
    big = runstate.folder_fingerprint(d, full_hash_limit=10)  # large files: size, mtime, header hash
    assert set(big["model.safetensors"]) == {"size", "mtime_ns", "header_sha256"}
    assert big["model.safetensors"]["header_sha256"] == hashlib.sha256(b"\x02" + b"\x00" * 7 + b"{}").hexdigest()
    (d / "config.json").write_text('{"a": 2}')
    assert runstate.folder_fingerprint(d)["config.json"] != small["config.json"]


def test_output_fingerprint_reads_a_bounded_number_of_bytes(tmp_path):
    """Whatever the size, the fingerprint reads at most 2.5 MiB: the head, the tail and a few
    blocks between (a small file whole). On a sparse 64 GiB file it sees a byte changed in the
    head, in the tail and in a sampled block."""
    MiB = 1 << 20
    for size in (0, 1, 5000, 2 * MiB, 3 * MiB, 41_900_000_000, 1 << 50):
        ranges = runstate.fingerprint_ranges(size)
        assert sum(n for _, n in ranges) <= runstate.FINGERPRINT_MAX_BYTES == 2.5 * MiB
        assert all(0 <= o and n > 0 and o + n <= size for o, n in ranges)
        assert all(a + n < b for (a, n), (b, _) in zip(ranges, ranges[1:]))  # sorted, disjoint, not touching
        if 0 < size <= 2 * MiB:
            assert ranges == [(0, size)]
        if size > 3 * MiB:
            assert ranges[0] == (0, MiB) and ranges[-1] == (size - MiB, MiB) and len(ranges) == 10
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(1 << 36)
    fp = runstate.output_fingerprint(big)
    assert fp["size"] == 1 << 36 and fp["ino"] == big.stat().st_ino
    seen = {fp["sample_sha256"]}
    for off in (10, (1 << 36) - 10, runstate.fingerprint_ranges(1 << 36)[4][0] + 7):
        _flip(big, off)
        seen.add(runstate.output_fingerprint(big)["sample_sha256"])
    assert len(seen) == 4
