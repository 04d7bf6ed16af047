"""Hub ids as inputs (issue 16): BASE and ADAPTER named ``org/name[@rev]``, resolved through the real
huggingface_hub client, from the Hugging Face cache first.

Nothing here reaches huggingface.co: the hub is :mod:`hubserver` on 127.0.0.1 (``HF_ENDPOINT``),
and ``HF_HOME`` is a temporary folder. huggingface_hub reads its environment when it is imported,
so every run by hub id is a real ``lora2gguf`` process with that environment (the CLI, or a few
lines of the Python API)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubserver import FakeHub
from lora2gguf import hub
from lora2gguf.errors import InputError, UnsupportedError

SRC = Path(__file__).resolve().parents[1] / "src"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
BASE_READ = {"config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS, "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
ADAPTER_READ = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja"}
# what the repos hold besides: a pickle, code, a subfolder, a card; lora2gguf fetches none of it
BASE_EXTRAS = {"pytorch_model.bin": b"\x80\x04\x95pickle", "modeling_gpt_oss.py": b"raise SystemExit('code ran')\n",
               "original/model.safetensors": b"\0" * 64, "README.md": b"# a base\n"}


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake_hub(tiny_base, tiny_adapter):
    h = FakeHub(lifetime=900)
    base_files = {p.name: p for p in tiny_base.iterdir() if p.is_file()}
    adapter_files = {p.name: p for p in tiny_adapter.iterdir() if p.is_file()}
    h.base_commit = h.add("org/base", base_files | BASE_EXTRAS)
    h.add("org/base-elsewhere", dict(base_files))  # the same model under another id: not in any cache
    h.adapter_commit = h.add("org/adapter", adapter_files | {"training_args.bin": b"\x80\x04pickle"})
    h.add("org/pickles", {"config.json": tiny_base / "config.json", "pytorch_model.bin": b"\x80\x04" * 500,
                          "tokenizer.json": tiny_base / "tokenizer.json"})
    h.add("org/gated-adapter", adapter_files, gated=True)
    h.add("org/private-adapter", adapter_files, private=True)
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]  # matches nothing in the base: doctor blocks it
    cfg.pop("target_parameters", None)
    h.add("org/bad-adapter", adapter_files | {"adapter_config.json": json.dumps(cfg).encode()})
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base-elsewhere"  # as PEFT records a base loaded by its id
    h.add("org/adapter-of-elsewhere", adapter_files | {"adapter_config.json": json.dumps(cfg).encode()})
    h.start()
    yield h
    h.stop()


def _env(fake: FakeHub | None, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1",
               HF_ENDPOINT=fake.endpoint if fake is not None else "http://127.0.0.1:9",
               PYTHONPATH=os.pathsep.join([str(SRC), str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora2gguf", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _py(code: str, env: dict[str, str], cwd: Path, *args: str, timeout: int = 300) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- pure parts


def test_spec_parsing(tmp_path, monkeypatch):
    assert hub.parse_spec("org/name") == ("org/name", None)
    assert hub.parse_spec("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_spec("org/name", "refs/pr/3") == ("org/name", "refs/pr/3")
    assert hub.parse_spec("./org/name") is None and hub.parse_spec("/abs/path") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.parse_spec("org/name") is None  # an existing folder wins over a hub id
    with pytest.raises(InputError, match="local folder"):
        hub.parse_spec("org/name", "main")
    with pytest.raises(InputError, match="two revisions"):
        hub.parse_spec("org/other@a", "b")


def test_selection_reads_only_what_lora2gguf_reads():
    names = {"config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS, "tokenizer.json",
             "consolidated.safetensors", "pytorch_model.bin", "modeling.py", "original/model.safetensors", "README.md"}
    index = {"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}
    sel = hub.select(hub.BASE, names, index)
    assert set(sel.weights) == set(SHARDS)  # the index's shards, not the consolidated copy
    assert set(sel.small) == {"config.json", "generation_config.json", "model.safetensors.index.json",
                              "tokenizer.json"}
    assert "pickle" in sel.skipped["pytorch_model.bin"] and "code" in sel.skipped["modeling.py"]
    assert "subfolder" in sel.skipped["original/model.safetensors"]
    assert "consolidated.safetensors" in sel.skipped
    with pytest.raises(UnsupportedError, match=r"only as pickles \(pytorch_model.bin\)"):
        hub.select(hub.BASE, {"config.json", "pytorch_model.bin", "tokenizer.json"})
    with pytest.raises(UnsupportedError, match="adapter_model.bin"):
        hub.select(hub.ADAPTER, {"adapter_config.json", "adapter_model.bin"})
    with pytest.raises(InputError, match="names 'model-9.safetensors', which the repo does not hold"):
        hub.select(hub.BASE, names, {"weight_map": {"a": "model-9.safetensors"}})


def test_a_cache_snapshot_is_known_by_its_repo_id(tmp_path):
    """doctor compares the base an adapter names (often a hub id) with the base given: a snapshot
    folder is called by its commit, so its repo id counts as its name."""
    from lora2gguf.doctor.checks import _cache_repo_id

    snap = tmp_path / "hub" / "models--unsloth--gpt-oss-20b-BF16" / "snapshots" / ("a" * 40)
    assert _cache_repo_id(snap) == "unsloth/gpt-oss-20b-BF16"
    assert _cache_repo_id(tmp_path / "gpt-oss-20b") == ""


# ------------------------------------------------------------------------------- by the network


def test_download_reads_only_what_it_needs_and_resumes_after_an_interruption(fake_hub, tmp_path, tiny_base,
                                                                             tiny_adapter):
    home, out = tmp_path / "hf", tmp_path / "out"
    # the client must still be waiting on the stalled transfer when Ctrl-C comes: with the default
    # 10 s read timeout a loaded machine let it resume and finish first (seen once in CI), and with
    # 120 s once more (its read timed out and resumed before the wait below ended; the client then
    # took over 120 s to answer Ctrl-C): the read now outlasts the wait's own 300 s limit
    env = _env(fake_hub, home, HF_HUB_DOWNLOAD_TIMEOUT="600")
    storage = home / "hub" / "models--org--base"
    snapshot = storage / "snapshots" / fake_hub.base_commit
    etags = {n: _sha(tiny_base / n) for n in SHARDS}  # an LFS file's etag is its SHA-256
    sizes = {n: (tiny_base / n).stat().st_size for n in SHARDS}
    cmd = [sys.executable, "-m", "lora2gguf", "build", "org/base", "org/adapter", "-o", str(out), "--no-verify"]

    # run 1: the first shard's transfer stops in the middle; the user presses Ctrl-C
    reached, release = fake_hub.stall_file(SHARDS[0], after=12 * 2**20)
    partial = storage / "blobs" / (etags[SHARDS[0]] + hub.PARTIAL_SUFFIX)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reached.wait(180), "the download never reached the shard"
        other = storage / "blobs" / etags[SHARDS[1]]
        # the client writes what it received (a 10 MiB chunk) into the partial file, and the other
        # shard, fetched in parallel, completes; the transfer stays stalled until release is set
        # (a 60 s cap on the stall let a loaded CI machine resume and finish before Ctrl-C)
        deadline = time.monotonic() + 300
        while not (partial.is_file() and partial.stat().st_size > 0 and other.is_file()):
            assert time.monotonic() < deadline and proc.poll() is None, (
                f"partial file {partial.is_file() and partial.stat().st_size}, other shard {other.is_file()}, "
                f"client exit {proc.poll()}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err1 = proc.communicate(timeout=120)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err1[-2000:]
    assert "interrupted" in err1
    # the bytes were known, and shown, before the weights were fetched
    assert f"0/{sum(sizes.values()) / 2**20:,.0f} MiB" in err1
    held = {}
    for n in SHARDS:
        blob = storage / "blobs" / etags[n]
        part = blob.with_name(blob.name + hub.PARTIAL_SUFFIX)
        held[n] = sizes[n] if blob.is_file() else part.stat().st_size if part.is_file() else 0
    assert 0 < held[SHARDS[0]] < sizes[SHARDS[0]]
    assert held[SHARDS[1]] == sizes[SHARDS[1]]  # downloaded while the first one was stalled
    assert not (snapshot / SHARDS[0]).exists()  # a partial file never joins the snapshot

    # run 2: the same command resumes each partial file from where it stopped
    before = len(fake_hub.requests())
    r = _cli(cmd[3:], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    later = [x for x in fake_hub.requests()[before:] if x["method"] == "GET" and x["repo"] == "org/base"]
    for n in SHARDS:
        data = [x for x in later if x["file"] == n and not (x["range"] or "").startswith("bytes=0-")]
        if held[n] == sizes[n]:
            assert data == [], n
        else:
            assert [x["range"] for x in data] == [f"bytes={held[n]}-" if held[n] else None], n
            assert data[0]["sent"] == sizes[n] - held[n]
        assert (snapshot / n).is_symlink() and _sha(snapshot / n) == etags[n]

    # only the files lora2gguf reads were fetched: never the pickle, the code, a subfolder or the card
    assert set(fake_hub.fetched("org/base")) == BASE_READ
    assert set(fake_hub.fetched("org/adapter")) == ADAPTER_READ
    for n in BASE_READ:
        assert _sha(snapshot / n) == _sha(tiny_base / n)

    # the cache is one huggingface_hub recognises as its own
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(home / "hub")
    assert not info.warnings
    repo = next(x for x in info.repos if x.repo_id == "org/base")
    (rev,) = repo.revisions
    assert rev.commit_hash == fake_hub.base_commit and "main" in rev.refs
    assert {f.file_name for f in rev.files} == BASE_READ

    rec = json.loads((out / "run.json").read_text())
    b, a = rec["inputs"]["base"], rec["inputs"]["adapter"]
    assert (b["repo"], b["revision"], b["commit"]) == ("org/base", None, fake_hub.base_commit)
    assert (a["repo"], a["commit"]) == ("org/adapter", fake_hub.adapter_commit)
    assert b["from_cache"] is False and b["downloaded_bytes"] == sum(sizes[n] - held[n] for n in SHARDS)
    assert set(b["skipped"]) == set(BASE_EXTRAS) and "pickle" in b["skipped"]["pytorch_model.bin"]
    assert Path(rec["base_dir"]) == snapshot
    assert (out / "adapter-BF16.gguf").is_file()


AUDIT = r"""
import json, os, sys, threading
log = open(sys.argv[1], "w")
lock = threading.Lock()  # a build opens files on several threads; a text file is not thread-safe
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        line = json.dumps([event, os.path.abspath(os.fsdecode(args[0]))])
    elif event == "socket.connect":
        line = json.dumps(["connect", repr(args[1])])
    else:
        return
    with lock:
        log.write(line + "\n")
sys.addaudithook(hook)
from lora2gguf.cli import main
code = main(sys.argv[2:])
log.flush()
sys.exit(code)
"""


def test_build_by_id_offline_from_a_cache_huggingface_hub_made(fake_hub, tmp_path, tiny_base, tiny_adapter):
    """A cache laid out by huggingface_hub's own snapshot_download; then, with HF_HUB_OFFLINE=1 and
    no hub at all, `build` by id reads the two snapshots and nothing else, and writes the GGUF a
    build from the folders writes."""
    from huggingface_hub import snapshot_download

    from lora2gguf.api import build

    cache = tmp_path / "hf" / "hub"
    snap_b = Path(snapshot_download("org/base", cache_dir=cache, endpoint=fake_hub.endpoint,
                                    allow_patterns=sorted(BASE_READ), token=False))
    snap_a = Path(snapshot_download("org/adapter", cache_dir=cache, endpoint=fake_hub.endpoint,
                                    allow_patterns=sorted(ADAPTER_READ), token=False))
    assert snap_b.name == fake_hub.base_commit and (snap_b / SHARDS[0]).is_symlink()
    served = len(fake_hub.requests())

    out, audit = tmp_path / "out", tmp_path / "opened.jsonl"
    env = _env(None, tmp_path / "hf", HF_HUB_OFFLINE="1")  # and HF_ENDPOINT is a closed port
    r = subprocess.run([sys.executable, "-c", AUDIT, str(audit), "build", "org/base", "org/adapter", "-o", str(out),
                        "--no-verify"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(fake_hub.requests()) == served
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert not [e for e in events if e[0] == "connect"]  # no network at all
    opened = [Path(e[1]) for e in events if e[0] == "open"]
    refs = {snap_b.parents[1] / "refs" / "main", snap_a.parents[1] / "refs" / "main"}
    assert any(p.parent == snap_b and p.name == SHARDS[0] for p in opened)  # it did read the snapshot
    for p in opened:
        for source in (tiny_base, tiny_adapter):
            assert source.resolve() not in p.resolve().parents, p
        if cache in p.parents:  # inside the cache: the two snapshots, and the refs that name them
            assert p.parent in (snap_b, snap_a) or p in refs, p
    rec = json.loads((out / "run.json").read_text())
    assert Path(rec["base_dir"]) == snap_b and Path(rec["adapter_dir"]) == snap_a
    assert rec["inputs"]["base"]["from_cache"] is True and rec["inputs"]["base"]["commit"] == fake_hub.base_commit
    # the same GGUF a build from the two folders writes
    local = build(tiny_base, tiny_adapter, tmp_path / "local", name="adapter")
    assert rec["outputs"][0]["sha256"] == local.outputs[0].sha256


ERRORS = r"""
import json, sys
from lora2gguf import hub
from lora2gguf.errors import Lora2GGUFError
out = {}
for key, spec, role in json.loads(sys.argv[1]):
    try:
        s = hub.resolve(spec, role)
        out[key] = {"ok": True, "commit": s.commit}
    except Lora2GGUFError as e:
        out[key] = {"ok": False, "type": type(e).__name__, "message": str(e)}
print(json.dumps(out))
"""


def test_clear_errors_for_pickles_revisions_missing_gated_private_and_offline(fake_hub, tmp_path):
    cases = [["pickles", "org/pickles", "base"], ["revision", "org/base@no-such-branch", "base"],
             ["missing", "org/missing", "adapter"], ["gated", "org/gated-adapter", "adapter"],
             ["private", "org/private-adapter", "adapter"]]
    res = _py(ERRORS, _env(fake_hub, tmp_path / "hf"), tmp_path, json.dumps(cases))
    assert res["pickles"]["type"] == "UnsupportedError"
    assert "pytorch_model.bin" in res["pickles"]["message"] and "Nothing was downloaded" in res["pickles"]["message"]
    assert [x["path"] for x in fake_hub.requests(repo="org/pickles")] == ["/api/models/org/pickles?blobs=true"]
    m = res["revision"]["message"]
    assert res["revision"]["type"] == "HubError" and "org/base" in m and "'no-such-branch'" in m
    assert "org/missing" in res["missing"]["message"] and "hf auth login" in res["missing"]["message"]
    m = res["gated"]["message"]
    assert "org/gated-adapter is gated" in m and "Accept them at" in m and "HF_TOKEN" in m
    assert "org/private-adapter" in res["private"]["message"] and "private" in res["private"]["message"]
    # with the token, the gated and the private repo resolve
    res = _py(ERRORS, _env(fake_hub, tmp_path / "hf2", HF_TOKEN=fake_hub.token), tmp_path,
              json.dumps(cases[3:]))
    assert res["gated"]["ok"] and res["private"]["ok"]
    # offline, an id the cache does not hold says so and asks nothing of the hub
    served = len(fake_hub.requests())
    res = _py(ERRORS, _env(fake_hub, tmp_path / "hf3", HF_HUB_OFFLINE="1"), tmp_path,
              json.dumps([["offline", "org/base", "base"]]))
    assert "HF_HUB_OFFLINE" in res["offline"]["message"] and "org/base" in res["offline"]["message"]
    assert len(fake_hub.requests()) == served


DOCTOR = r"""
import json, sys
from lora2gguf import api
out = sys.argv[1]
probe = api.doctor("org/base-elsewhere", "org/adapter-of-elsewhere", out_dir=out, free_bytes=10**15).to_dict()
res = next(f for f in probe["findings"] if f["code"] == "RESOURCES")["data"]
free = res["bytes_needed"] + res["download"]["bytes"] // 2   # room for the outputs, not for the download too
tight = api.doctor("org/base-elsewhere", "org/adapter-of-elsewhere", out_dir=out, free_bytes=free)
print(json.dumps({"probe": probe, "tight": tight.to_dict()}))
"""


def test_doctor_by_id_counts_the_download_and_build_stops_before_the_weights(fake_hub, tmp_path, tiny_base):
    home, tmp = tmp_path / "hf", tmp_path / "tmp"
    tmp.mkdir()
    env = _env(fake_hub, home, TMPDIR=str(tmp))
    res = _py(DOCTOR, env, tmp_path, str(tmp_path / "out"))
    shard_bytes = sum((tiny_base / n).stat().st_size for n in SHARDS)
    data = next(f for f in res["probe"]["findings"] if f["code"] == "RESOURCES")["data"]
    assert data["download"]["bytes"] == shard_bytes and data["download"]["same_filesystem_as_outputs"]
    assert res["probe"]["inputs"]["base"]["repo"] == "org/base-elsewhere"
    assert res["probe"]["inputs"]["base"]["from_cache"] is False
    # the adapter names its base by id: the base read from its stand-in is known by that id
    assert "ADAPTER_BASE_NAME" not in {f["code"] for f in res["probe"]["findings"]}
    disk = [f for f in res["tight"]["findings"] if f["code"] == "DISK_SPACE"]
    assert len(disk) == 1 and disk[0]["data"]["download_bytes"] == shard_bytes
    assert disk[0]["data"]["bytes_needed"] == data["bytes_needed"] + shard_bytes
    assert list(tmp.iterdir()) == []  # the header-only stand-in was removed
    snapshot = home / "hub" / "models--org--base-elsewhere" / "snapshots" / res["tight"]["inputs"]["base"]["commit"]
    assert Path(res["tight"]["base_dir"]) == snapshot  # the report names where the files will be
    # doctor read the shards' headers (ranged reads), never their data
    gets = [x for x in fake_hub.requests("GET", "org/base-elsewhere") if x["file"] in SHARDS]
    assert gets and all(x["range"] == "bytes=0-99999" for x in gets)
    blobs = {p.name for p in (home / "hub" / "models--org--base-elsewhere" / "blobs").iterdir()}
    assert not blobs & {_sha(tiny_base / n) for n in SHARDS}

    # build: doctor blocks the adapter before a byte of the base's weights is downloaded
    r = _cli(["build", "org/base-elsewhere", "org/bad-adapter", "-o", str(tmp_path / "out2"), "--no-verify"], env,
             tmp_path)
    assert r.returncode == 2 and "nothing was downloaded or written" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    gets = [x for x in fake_hub.requests("GET", "org/base-elsewhere") if x["file"] in SHARDS]
    assert all(x["range"] == "bytes=0-99999" for x in gets)


def test_several_adapters_by_id_download_the_base_once_and_skip_the_blocked_one(fake_hub, tmp_path, tiny_base):
    env = _env(fake_hub, tmp_path / "hf")
    before = len(fake_hub.requests())
    out = tmp_path / "out"
    r = _cli(["build", "org/base-elsewhere", "org/adapter", "org/bad-adapter", "-o", str(out), "--no-verify"], env,
             tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]  # 2: an adapter was skipped
    assert "Traceback" not in r.stderr
    served = fake_hub.requests()[before:]
    for n in SHARDS:  # the base's weights: one full transfer each, after the header reads
        full = [x for x in served if x["method"] == "GET" and x["repo"] == "org/base-elsewhere" and x["file"] == n
                and x["range"] is None]
        assert len(full) == 1 and full[0]["sent"] == (tiny_base / n).stat().st_size
    cmp = json.loads((out / "comparison.json").read_text())
    status = {e["name"]: e["status"] for e in cmp["entries"]}
    assert status == {"adapter": "built", "bad-adapter": "skipped"}
    bad = next(e for e in cmp["entries"] if e["name"] == "bad-adapter")
    assert bad["findings"] and bad["input"]["repo"] == "org/bad-adapter"
    assert cmp["base"]["repo"] == "org/base-elsewhere" and cmp["base"]["inspections"] == 1
    assert cmp["ranking"] == ["adapter"]
    rec = json.loads((out / "adapter" / "run.json").read_text())
    assert rec["inputs"]["base"]["commit"] == cmp["base"]["commit"]
