"""Property-based tests (hypothesis) on the readers of untrusted input: the safetensors header parser,
Checkpoint.open (index.json), and the config readers. Whatever the bytes, they either return values
that satisfy the format's invariants or raise one of lora2gguf's documented errors (Lora2GGUFError
subclasses); never another exception. Bounded: a fixed number of examples per property, the whole
file well under a minute."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

from lora2gguf import hparams  # noqa: E402
from lora2gguf.adapter import check_config  # noqa: E402
from lora2gguf.api import read_json  # noqa: E402
from lora2gguf.errors import FormatError, InputError, Lora2GGUFError, UnsupportedError  # noqa: E402
from lora2gguf.safetensors_io import DTYPES, Checkpoint, parse_header  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
dtype_names = st.sampled_from(sorted(DTYPES)) | st.text(max_size=6)
dims = st.lists(st.integers(-3, 40) | st.just(2**62) | st.booleans() | st.floats(0, 5) | st.text(max_size=2), max_size=4)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="l2g_fuzz_") as d:
        yield Path(d)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _check_invariants(path: Path, tensors, n_header: int) -> None:
    """What a header that parses must guarantee before any data is trusted."""
    size = path.stat().st_size
    spans = []
    for name, t in tensors.items():
        assert t.dtype in DTYPES
        assert all(isinstance(d, int) and d >= 0 for d in t.shape)
        assert n_header <= t.begin <= t.end <= size, (name, t.begin, t.end, size)
        assert t.end - t.begin == math.prod(t.shape) * DTYPES[t.dtype][1]
        if t.end > t.begin:
            spans.append((t.begin, t.end))
    spans.sort()
    for (b0, e0), (b1, e1) in zip(spans, spans[1:]):
        assert b1 >= e0, "overlapping tensors accepted"


@FUZZ
@given(data=st.binary(max_size=300))
def test_parse_header_arbitrary_bytes(scratch, data):
    path = _write(scratch / "raw.safetensors", data)
    try:
        tensors, meta, n = parse_header(path)
    except Lora2GGUFError as e:
        assert str(path) in str(e)
        return
    _check_invariants(path, tensors, n)


@st.composite
def headers(draw):
    """A safetensors file built from a drawn header (sometimes valid, mostly subtly wrong)."""
    entries = {}
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.text(min_size=1, max_size=6)) if draw(st.booleans()) else f"t{i}"
        if draw(st.integers(0, 9)) == 0:
            entries[name] = draw(json_values)
            continue
        dtype = draw(dtype_names)
        shape = draw(dims)
        begin = draw(st.integers(-4, 64))
        length = draw(st.integers(-4, 64))
        offsets = draw(st.sampled_from([[begin, begin + length], [begin], [begin, begin + length, 0], "0,1",
                                        [float(begin), begin + length], [True, 1]]))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 5)) == 0:
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
        entries[name] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_scalars, max_size=3))
    raw = json.dumps(entries).encode()
    if draw(st.integers(0, 6)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # cut JSON
    declared = len(raw) + draw(st.sampled_from([0, 0, 0, 1, -1, 10**6, 2**63]))
    declared = max(declared, 0) % 2**64
    data = draw(st.binary(max_size=80))
    return struct.pack("<Q", declared) + raw + data


@FUZZ
@given(blob=headers())
def test_parse_header_structured(scratch, blob):
    path = _write(scratch / "h.safetensors", blob)
    try:
        tensors, meta, n = parse_header(path)
    except Lora2GGUFError as e:
        assert isinstance(e, (FormatError, InputError))
        assert str(path) in str(e)
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    _check_invariants(path, tensors, n)


def _valid_file(scratch: Path) -> bytes:
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
              "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(32))


@FUZZ
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 199), st.integers(1, 255)), max_size=3))
def test_parse_header_mutated_valid_file(scratch, cut, flips):
    """A valid file, truncated and with flipped bytes: parses (and is then consistent) or FormatError."""
    blob = bytearray(_valid_file(scratch))
    for pos, x in flips:
        if pos < len(blob):
            blob[pos] ^= x
    blob = bytes(blob[: min(cut, len(blob))]) if cut < len(blob) else bytes(blob)
    path = _write(scratch / "m.safetensors", blob)
    try:
        tensors, _, n = parse_header(path)
    except Lora2GGUFError as e:
        assert str(path) in str(e)
        return
    _check_invariants(path, tensors, n)


def test_parse_header_deep_nesting(scratch):
    """A hostile header nested deeper than Python's recursion limit is a FormatError, not a crash."""
    raw = b"[" * 100_000 + b"]" * 100_000
    path = _write(scratch / "deep.safetensors", struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        parse_header(path)


shard_names = st.sampled_from(["model-00001-of-00001.safetensors", "../outside.safetensors", "/etc/passwd",
                               "sub/../model-00001-of-00001.safetensors", "missing.safetensors", "", ".",
                               "model-00001-of-00001.safetensors/..", "link.safetensors"]) | st.text(max_size=10)


@FUZZ
@given(weight_map=st.dictionaries(st.text(min_size=1, max_size=4), shard_names | json_scalars, max_size=4)
       | json_values, wrap=st.booleans())
def test_checkpoint_open_index(scratch, weight_map, wrap):
    """Checkpoint.open on random index.json contents: refuses anything outside the folder or missing."""
    folder = scratch / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "model-00001-of-00001.safetensors").write_bytes(_valid_file(scratch))
    outside = scratch / "outside.safetensors"
    outside.write_bytes(_valid_file(scratch))
    link = folder / "link.safetensors"
    if not link.is_symlink():
        link.symlink_to(outside)
    index = {"metadata": {}, "weight_map": weight_map} if wrap else weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint.open(folder)
    except Lora2GGUFError as e:
        assert isinstance(e, (FormatError, InputError))
        return
    root = folder.resolve()
    for f in ckpt.files:
        assert root in Path(f).resolve().parents, f"read {f}, outside {folder}"
    assert set(ckpt.tensors) <= {"a", "b"}


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_read_json(scratch, data):
    path = _write(scratch / "config.json", data)
    try:
        out = read_json(path, "a config")
    except Lora2GGUFError as e:
        assert isinstance(e, (FormatError, InputError)) and str(path) in str(e)
        return
    assert isinstance(out, dict)


config_values = json_values | st.integers(-5, 5) | st.floats(-5, 5)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(["num_hidden_layers", "hidden_size", "n_layer", "x"]), config_values, max_size=4),
       required=st.booleans())
def test_hparams_find(config, required):
    keys = ("num_hidden_layers", "n_layer")
    try:
        value = hparams.find(config, keys, "config.json", required)
    except Lora2GGUFError as e:
        assert isinstance(e, InputError) and "config.json" in str(e)
        return
    if value is None:
        assert not required
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool)


@FUZZ
@given(config=st.fixed_dictionaries(
    {}, optional={"peft_type": st.sampled_from(["LORA", "LOHA", None, 3]), "r": config_values,
                  "lora_alpha": config_values, "use_dora": config_values, "rank_pattern": config_values,
                  "alpha_pattern": config_values, "modules_to_save": config_values, "lora_bias": config_values}))
@example(config={"peft_type": "LORA", "r": 4, "lora_alpha": float("nan")})  # json.loads accepts NaN
@example(config={"peft_type": "LORA", "r": 4, "lora_alpha": float("inf")})
def test_adapter_check_config(config):
    path = Path("adapter_config.json")
    try:
        check_config(config, path)
    except Lora2GGUFError as e:
        assert isinstance(e, (InputError, UnsupportedError)) and str(path) in str(e)
        return
    assert config["peft_type"] == "LORA"
    assert isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0
    assert math.isfinite(config["lora_alpha"]) and config["lora_alpha"] > 0
