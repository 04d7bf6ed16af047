"""The inspect stage: hashes, tokenizer reading, logical shapes of quantized layouts, adapter
statistics, and the promise that doctor reads under 1 MB of a 40 GB base (counted, not assumed)."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from lora2gguf import doctor, inspect as ins, o200k, synth
from lora2gguf.safetensors_io import Checkpoint

#: gpt-oss-20b: 24 layers of the real widths; in BF16 about 41.8 GB
GPT_OSS_20B = dict(synth.REAL_WIDTH, num_hidden_layers=24)


# --------------------------------------------------------------------------- a counting open()


class CountingFile:
    """Wraps a real file object and adds every byte it returns to ``counts[path]``."""

    def __init__(self, f, path: str, counts: dict[str, int]):
        self._f, self._path, self._counts = f, path, counts

    def _add(self, n: int) -> None:
        self._counts[self._path] = self._counts.get(self._path, 0) + n

    def read(self, *a):
        data = self._f.read(*a)
        self._add(len(data))
        return data

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self._add(n or 0)
        return n

    def readline(self, *a):
        data = self._f.readline(*a)
        self._add(len(data))
        return data

    def readlines(self, *a):
        lines = self._f.readlines(*a)
        self._add(sum(len(x) for x in lines))
        return lines

    def __iter__(self):
        for line in self._f:
            self._add(len(line))
            yield line

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        if name in ("readall", "read1", "readinto1", "fileno"):  # reads (or raw access) we would not count
            raise AssertionError(f"uncounted file access {name} on {self._path}")
        return getattr(self._f, name)


@pytest.fixture
def counting_open(monkeypatch):
    counts: dict[str, int] = {}
    real_open = io.open

    def counted(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if "r" in mode and not isinstance(file, int):
            return CountingFile(f, str(Path(file).resolve()), counts)
        return f

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(io, "open", counted)
    return counts


# --------------------------------------------------------------------------- sparse real-size bases


def _header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, int]:
    sizes = {"BF16": 2, "U8": 1, "F32": 4}
    h, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape in tensors:
        n = math.prod(shape) * sizes[dt]
        h[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, off


def sparse_base(dest: Path, config: dict, tokenizer_dir: Path, *, mxfp4: bool = False,
                shard_bytes: int = 5_000_000_000) -> Path:
    """A base of real size whose shards are sparse files: valid headers, data never written (zeros)."""
    dest.mkdir(parents=True)
    specs = []
    for name, shape in synth.tensor_specs(config):
        if mxfp4 and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            e, n_in, n_out = shape
            specs.append((name + "_blocks", "U8", (e, n_out, n_in // 32, 16)))
            specs.append((name + "_scales", "U8", (e, n_out, n_in // 32)))
        else:
            specs.append((name, "BF16", shape))
    shards, cur, size = [], [], 0
    for s in specs:
        n = math.prod(s[2]) * (1 if s[1] == "U8" else 2)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += n
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        head, data = _header(shard)
        with open(dest / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + data)
        weight_map.update({s[0]: fname for s in shard})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config)
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (dest / "config.json").write_text(json.dumps(cfg))
    (dest / "generation_config.json").write_text(json.dumps(synth.generation_config()))
    for p in tokenizer_dir.iterdir():
        shutil.copyfile(p, dest / p.name)
    return dest


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory, o200k_tokenizer_dir):
    root = tmp_path_factory.mktemp("big")
    base = sparse_base(root / "gpt-oss-20b-BF16", synth.gpt_oss_config(**GPT_OSS_20B), o200k_tokenizer_dir)
    adapter = synth.make_adapter_numpy(base, root / "adapter", r=4, target_parameters=(), save_dtype="bfloat16")
    return base, adapter


@pytest.mark.parametrize("mxfp4", [False, True], ids=["bf16", "mxfp4"])
def test_doctor_reads_under_1mb_of_a_40gb_base(big_pair, counting_open, tmp_path, o200k_tokenizer_dir, mxfp4):
    base, adapter = big_pair
    if mxfp4:
        base = sparse_base(tmp_path / "gpt-oss-20b", synth.gpt_oss_config(**GPT_OSS_20B), o200k_tokenizer_dir,
                           mxfp4=True)
    shards = {str(p.resolve()) for p in base.glob("*.safetensors")}
    total = sum(Path(p).stat().st_size for p in shards)
    assert total > (40e9 if not mxfp4 else 12e9)
    counting_open.clear()
    report = doctor.run(base, adapter, free_bytes=10**13)
    from_shards = sum(n for p, n in counting_open.items() if p in shards)
    assert 0 < from_shards < 1_000_000
    assert from_shards == report.inspection.base_weight_bytes_read == report.bytes_read["base_weights"]
    # everything doctor read from the base folder beyond the shards is the small files, each read in full
    others = {p: n for p, n in counting_open.items() if Path(p).parent == base.resolve() and p not in shards}
    assert set(Path(p).name for p in others) <= {"config.json", "generation_config.json",
                                                 "model.safetensors.index.json", *ins.TOKENIZER_FILES}
    assert report.blocking() == [], report.to_json()
    assert ("BASE_MXFP4" in report.codes) is mxfp4
    # the resource estimate is the real size: BF16 out ~ the BF16 shards in
    bf16 = report.resources.outputs[0]
    assert bf16.name == "BF16"
    # the merge streams 64 MiB slabs, a few per worker thread: the working set does not grow
    # with the 2.1 GB expert tensors
    from lora2gguf.stream import LOOKAHEAD_BYTES, default_threads
    assert 64 * 2**20 < report.resources.peak_memory_bytes < default_threads() * 320 * 2**20 + LOOKAHEAD_BYTES
    if not mxfp4:
        assert abs(bf16.bytes - total) / total < 0.01
        q4 = report.resources.outputs[1]
        # 2880-wide rows do not fit Q4_K's 256-blocks: llama.cpp uses Q5_0 (5.5 bits) for them, so
        # Q4_K_M comes out at about a third of BF16 (the seed run: 15 GB from 39 GB)
        assert q4.name == "Q4_K_M" and 0.30 < q4.bytes / bf16.bytes < 0.40


def test_logical_shapes_undo_mxfp4(tmp_path, o200k_tokenizer_dir):
    cfg = synth.gpt_oss_config(**dict(GPT_OSS_20B, num_hidden_layers=1))
    mx = sparse_base(tmp_path / "mx", cfg, o200k_tokenizer_dir, mxfp4=True)
    base = ins.inspect_base(mx)
    assert base.logical_shapes == dict(synth.tensor_specs(cfg))
    assert base.tensor_bytes_read == 0 and not base.errors


def test_hash_file_is_md5_and_sha256(tmp_path):
    p = tmp_path / "x.bin"
    data = np.random.default_rng(0).bytes(3 << 20)
    p.write_bytes(data)
    h = ins.hash_file(p)
    assert (h.size, h.md5, h.sha256) == (len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())


def test_inspect_tokenizer_reads_the_gpt_oss_files(o200k_tokenizer_dir):
    tok = ins.inspect_tokenizer(o200k_tokenizer_dir)
    assert not tok.errors
    assert set(tok.hashes) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                               "chat_template.jinja"}
    assert tok.special("eos_token") == o200k.EOS_TOKEN and tok.token_id(o200k.EOS_TOKEN) == 200002
    assert tok.special("pad_token") == o200k.PAD_TOKEN and tok.special("bos_token") == o200k.BOS_TOKEN
    assert tok.is_special("<|call|>") and not tok.is_special("hello")
    assert tok.model.size == o200k.VOCAB_SIZE and tok.model.model_type == "BPE"
    assert tok.chat_template == o200k.HARMONY_CHAT_TEMPLATE and tok.chat_template_source == "chat_template.jinja"
    assert ins.inspect_tokenizer(o200k_tokenizer_dir / "nothing-here") is None


def test_tensor_stats(tmp_path):
    from safetensors.numpy import save_file
    a = np.zeros((4, 8), np.float32)
    b = np.arange(32, dtype=np.float32).reshape(4, 8) - 16
    b[0, 0] = np.nan
    b[1, 1] = -np.inf
    save_file({"a": a, "b": b, "i": np.ones(3, np.int32)}, str(tmp_path / "t.safetensors"))
    ck = Checkpoint.open(tmp_path, single_name="t.safetensors")
    sa, sb = ins.tensor_stats(ck.info("a")), ins.tensor_stats(ck.info("b"))
    assert (sa.all_zero, sa.nonfinite, sa.absmax) == (True, 0, 0.0)
    assert (sb.all_zero, sb.nonfinite, sb.absmax) == (False, 2, 15.0)
    assert ins.tensor_stats(ck.info("i")) is None


def test_bnb_quant_state_that_is_not_json_is_an_error(tmp_path):
    from safetensors.numpy import save_file
    d = tmp_path / "b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(synth.gpt_oss_config()))
    save_file({"x.weight": np.zeros((8, 1), np.uint8),
               "x.weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"{oops", np.uint8).copy()},
              str(d / "model.safetensors"))
    base = ins.inspect_base(d)
    assert len(base.errors) == 1 and "x.weight.quant_state.bitsandbytes__nf4" in str(base.errors[0])
    assert "x.weight" not in base.logical_shapes


def test_missing_folders_are_recorded_not_raised(tmp_path):
    i = ins.inspect(tmp_path / "no-base", tmp_path / "no-adapter")
    assert "not found" in str(i.base.errors[0]) and "not found" in str(i.adapter.errors[0])
    report = doctor.run(tmp_path / "no-base", tmp_path / "no-adapter")
    assert {"BASE_INVALID", "ADAPTER_INVALID", "TOKENIZER_MISSING"} <= report.codes
    assert report.exit_code == 2
