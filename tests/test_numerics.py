"""Numeric kernels (lora2gguf.numerics): known values, and equality with the real references
(torch's bfloat16 cast, transformers' MXFP4 dequantizer, gguf-py's MXFP4 decoder, llama.cpp's
converter repack, bitsandbytes' formats)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf import numerics as N
from lora2gguf.errors import FormatError, UnsupportedError

REF_LLAMA_CPP = Path.home() / ".cache/lora2gguf/ref/llama_cpp_python-0.3.36/vendor/llama.cpp"


def f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def bf16_of(bits32: list[int]) -> list[int]:
    return N.f32_to_bf16_bits(np.array(bits32, dtype=np.uint32).view(np.float32)).tolist()


# ------------------------------------------------------------------------------------ bfloat16

def test_bf16_round_to_nearest_even_known_values():
    cases = {
        0x3F800000: 0x3F80,  # 1.0
        0x3F808000: 0x3F80,  # exactly half an ulp above 1.0: tie -> even (down)
        0x3F818000: 0x3F82,  # tie above an odd mantissa -> even (up)
        0x3F808001: 0x3F81,  # just above the tie -> up
        0x3F807FFF: 0x3F80,  # just below the tie -> down
        0xBF808000: 0xBF80,  # negative tie -> even
        0xBF818000: 0xBF82,
        0x00000001: 0x0000,  # smallest f32 subnormal -> +0
        0x00008000: 0x0000,  # subnormal tie -> even (0)
        0x00018000: 0x0002,  # subnormal tie above odd -> up
        0x00010000: 0x0001,  # smallest bf16 subnormal, exact
        0x007FFFFF: 0x0080,  # largest f32 subnormal rounds up to the smallest normal
        0x80000000: 0x8000,  # -0.0 keeps its sign
        0x7F7F0000: 0x7F7F,  # largest finite bf16, exact
        0x7F7F7FFF: 0x7F7F,  # below the tie: stays finite
        0x7F7F8000: 0x7F80,  # tie above odd mantissa: overflows to +Inf as IEEE does
        0x7F7FFFFF: 0x7F80,  # largest finite f32 -> +Inf
        0xFF7FFFFF: 0xFF80,  # -> -Inf
        0x7F800000: 0x7F80,  # +Inf
        0xFF800000: 0xFF80,  # -Inf
    }
    assert bf16_of(list(cases)) == list(cases.values())


def test_bf16_nan_stays_nan_quiet_with_sign():
    got = bf16_of([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF])
    assert got == [0x7FC0, 0xFFC0, 0x7FC0, 0xFFC0, 0x7FE0, 0x7FFF]
    back = N.bf16_bits_to_f32(np.array(got, dtype=np.uint16))
    assert np.isnan(back).all()
    assert np.signbit(back).tolist() == [False, True, False, True, False, False]


def test_bf16_matches_torch_on_random_bit_patterns():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    # plus edge values and their neighbourhoods: ties, subnormals, max finite, zeros, infs, NaNs
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0x7F7F8000,
                      0x007FFFFF, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000], dtype=np.uint32)
    near = (edges[:, None].astype(np.int64) + np.arange(-3, 4)[None, :]) % 2**32
    bits = np.concatenate([bits, near.reshape(-1).astype(np.uint32)])
    # random values of ordinary magnitude too, where ties are rare but rounding matters
    x = np.concatenate([bits.view(np.float32), rng.standard_normal(200_000).astype(np.float32)])
    mine = N.f32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.sum() > 1000 and (~nan).sum() > 1_000_000
    np.testing.assert_array_equal(mine[~nan], ref[~nan])
    # torch drops a NaN's sign (0x7FC0); ours keeps it (as ggml does); both stay NaN
    assert np.isnan(N.bf16_bits_to_f32(mine[nan])).all()
    assert np.isnan(N.bf16_bits_to_f32(ref[nan])).all()


def test_bf16_matches_gguf_py_quantizer():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)
    np.testing.assert_array_equal(N.f32_to_bf16_bits(x), ref)


def test_bf16_bits_roundtrip_all_patterns():
    u = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    x = N.bf16_bits_to_f32(u)
    assert x.dtype == np.float32
    back = N.f32_to_bf16_bits(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(back[~nan], u[~nan])
    assert np.isnan(N.bf16_bits_to_f32(back[nan])).all()
    assert float(x[0x3F80]) == 1.0 and float(x[0xC000]) == -2.0


def test_bf16_refuses_float64():
    with pytest.raises(FormatError, match="float64"):
        N.f32_to_bf16_bits(np.zeros(3))


# ------------------------------------------------------------------------------------ MXFP4

def _one_block(codes: list[int]) -> np.ndarray:
    """32 codes -> the 16 bytes of one HF MXFP4 block (low nibble first)."""
    c = np.array(codes, dtype=np.uint8)
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8)


def test_mxfp4_every_code_and_scale_extremes():
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = list(range(16)) * 2
    blocks = np.stack([_one_block(codes)] * 7)[:, None, :]  # 7 rows of one block
    scale_bytes = [0, 1, 100, 126, 127, 128, 254]
    scales = np.array(scale_bytes, dtype=np.uint8)[:, None]
    out = N.decode_mxfp4(blocks, scales)
    assert out.shape == (7, 32) and out.dtype == np.float32
    for row, s in enumerate(scale_bytes):
        for k, code in enumerate(codes):
            sign = -1.0 if code & 8 else 1.0
            want = sign * math.ldexp(e2m1[code & 7], s - 127)
            got = float(out[row, k])
            if abs(want) > float(np.finfo(np.float32).max):
                assert got == want * math.inf  # past float32's range: +-Inf, as ldexp gives
            else:
                assert got == want, (s, code)
            assert math.copysign(1.0, got) == sign  # -0.0 for code 8
    assert float(out[0, 1]) == 2.0 ** -128  # 0.5 * 2**-127, a float32 subnormal, exact


def test_mxfp4_nibble_order_low_first():
    b = np.zeros((1, 16), dtype=np.uint8)  # one block: G=1
    b[0, 0] = 0x21  # element 0 = code 1 (0.5), element 1 = code 2 (1.0)
    b[0, 15] = 0x7F  # element 30 = code 15 (-6), element 31 = code 7 (6)
    out = N.decode_mxfp4(b, np.array([127], dtype=np.uint8))
    assert out.shape == (32,)
    assert out[0] == 0.5 and out[1] == 1.0 and out[30] == -6.0 and out[31] == 6.0
    assert not out[2:30].any()


def test_mxfp4_scale_nan_and_shape_errors():
    b = np.zeros((2, 16), dtype=np.uint8)
    with pytest.raises(FormatError, match="0xFF"):
        N.decode_mxfp4(b, np.array([127, 255], dtype=np.uint8), name="x_scales")
    with pytest.raises(FormatError, match="shape"):
        N.decode_mxfp4(b, np.array([127, 127, 127], dtype=np.uint8))
    with pytest.raises(FormatError):
        N.decode_mxfp4(np.zeros((2, 8), dtype=np.uint8), np.zeros(2, dtype=np.uint8))


def _random_mx(rng, shape_rows: tuple[int, ...], g: int, lo=0, hi=255):
    blocks = rng.integers(0, 256, size=(*shape_rows, g, 16), dtype=np.uint8)
    scales = rng.integers(lo, hi, size=(*shape_rows, g), dtype=np.uint8)
    return blocks, scales


def test_mxfp4_matches_transformers_dequantizer():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(3)
    blocks, scales = _random_mx(rng, (3, 12), 4)  # (E, rows, G, 16): rows=12 outputs, 128 inputs
    for dtype in (torch.float32, torch.bfloat16):
        ref = mx.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
        assert tuple(ref.shape) == (3, 128, 12)  # transposed: the BF16 checkpoint's layout
        mine = N.decode_mxfp4_expert(blocks, scales)
        assert mine.shape == (3, 128, 12) and mine.flags.c_contiguous
        if dtype == torch.float32:
            np.testing.assert_array_equal(mine.view(np.uint32), ref.numpy().view(np.uint32))
        else:
            np.testing.assert_array_equal(N.f32_to_bf16_bits(mine), ref.view(torch.int16).numpy().view(np.uint16))
    # the un-transposed decode is the row-major (E, rows, G*32) view of the same numbers
    np.testing.assert_array_equal(N.decode_mxfp4(blocks, scales), np.swapaxes(N.decode_mxfp4_expert(blocks, scales), 1, 2))
    np.testing.assert_array_equal(N.decode_mxfp4_expert(blocks, scales, experts=1), N.decode_mxfp4_expert(blocks, scales)[1])
    np.testing.assert_array_equal(N.decode_mxfp4_expert(blocks, scales, experts=slice(1, 3)),
                                  N.decode_mxfp4_expert(blocks, scales)[1:3])


def test_encode_mxfp4_known_values():
    x = np.zeros((3, 32), dtype=np.float32)
    x[0, :8] = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # max 6 -> scale 2**0; ties to even
    x[0, 8:12] = [-0.25, -5.0, -6.0, -0.0]
    x[1, :3] = [7.0, 0.2, -7.9]  # max 7.9 -> scale 2**0, saturates to +-6; 0.2 -> 0
    x[2, :2] = [96.0, 40.0]  # max 96 = 1.5 * 2**6 -> scale 2**(6-2); 40/16 = 2.5 -> 2 (tie to even)
    blocks, scales = N.encode_mxfp4(x)
    assert blocks.shape == (3, 1, 16) and scales.shape == (3, 1)
    assert scales[:, 0].tolist() == [127, 127, 131]
    y = N.decode_mxfp4(blocks, scales)
    assert y[0, :12].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, -6.0, -0.0]
    assert np.signbit(y[0, [8, 11]]).all() and not np.signbit(y[0, 1])
    assert y[1, :3].tolist() == [6.0, 0.0, -6.0]
    assert y[2, :2].tolist() == [96.0, 32.0]
    # all-zero block: scale byte 0, all codes 0
    zb, zs = N.encode_mxfp4(np.zeros((1, 64), dtype=np.float32))
    assert not zb.any() and not zs.any()
    with pytest.raises(FormatError):
        N.encode_mxfp4(np.zeros((1, 48), dtype=np.float32))


def test_encode_mxfp4_roundtrip_exact_on_grid():
    rng = np.random.default_rng(4)
    blocks, scales = _random_mx(rng, (5, 7), 3, lo=0, hi=250)  # 250+: 6 * 2**123+ still finite
    x = N.decode_mxfp4(blocks, scales)
    b2, s2 = N.encode_mxfp4(x)
    np.testing.assert_array_equal(N.decode_mxfp4(b2, s2).view(np.uint32), x.view(np.uint32))
    # off-grid data: every value lands on the nearest grid point of its block's scale
    # (grid gaps are 0.5, 1 and 2 scales; magnitudes past 6 scales saturate to 6)
    z = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    zb, zs = N.encode_mxfp4(z)
    zd = N.decode_mxfp4(zb, zs)
    step = np.repeat(N.e8m0_to_f32(zs), 32, axis=-1)
    mag = np.abs(z) / step
    bound = np.select([mag < 2, mag < 4, mag <= 6], [0.25, 0.5, 1.0], mag - 6).astype(np.float32) * step
    assert np.all(np.abs(zd - z) <= bound)
    assert np.all(np.sign(zd) * np.sign(z) >= 0)


def test_mxfp4_hf_to_ggml_decodes_with_gguf_py():
    rng = np.random.default_rng(5)
    blocks, scales = _random_mx(rng, (3, 10), 6)
    packed = N.mxfp4_hf_to_ggml(blocks, scales)
    assert packed.shape == (3, 10, 6 * 17) and packed.dtype == np.uint8
    with np.errstate(over="ignore"):  # 6 * 2**127 is +-Inf on both sides
        ref = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.MXFP4)
    assert ref.shape == (3, 10, 6 * 32)
    np.testing.assert_array_equal(ref, N.decode_mxfp4(blocks, scales))


def test_mxfp4_hf_to_ggml_word_path_equals_byte_path(monkeypatch):
    rng = np.random.default_rng(8)
    blocks, scales = _random_mx(rng, (70_000,), 1)  # more than one chunk
    fast = N.mxfp4_hf_to_ggml(blocks, scales)
    monkeypatch.setattr(N.sys, "byteorder", "big")  # forces the plain per-byte path
    slow = N.mxfp4_hf_to_ggml(blocks, scales)
    assert fast.tobytes() == slow.tobytes()


def test_transpose_last2_tiled():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 600, 1100)).astype(np.float32)  # several tiles, ragged edges
    t = N.transpose_last2(a)
    assert t.shape == (2, 1100, 600) and t.flags.c_contiguous
    np.testing.assert_array_equal(t, np.swapaxes(a, 1, 2))


_REF_REPACK = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from conversion.gpt_oss import GptOssModel
class Recorder:
    def __init__(self): self.out = {}
    def add_tensor(self, name, data, raw_dtype=None): self.out[name] = (data, int(raw_dtype))
class Host:  # the reference method's `self`: only gguf_writer and transform_nibble_layout are used
    transform_nibble_layout = GptOssModel.transform_nibble_layout
    repack_mxfp4 = GptOssModel.repack_mxfp4
    def __init__(self): self.gguf_writer = Recorder()
d = np.load(sys.argv[2])
h = Host()
gb, gs = torch.from_numpy(d["gate_up_blocks"]), torch.from_numpy(d["gate_up_scales"])
h.repack_mxfp4("gate", gb[:, ::2, :, :], gs[:, ::2, :])
h.repack_mxfp4("up", gb[:, 1::2, :, :], gs[:, 1::2, :])
h.repack_mxfp4("down", torch.from_numpy(d["down_blocks"]), torch.from_numpy(d["down_scales"]))
np.savez(sys.argv[3], **{k: v[0] for k, v in h.gguf_writer.out.items()},
         **{k + "_type": np.array(v[1]) for k, v in h.gguf_writer.out.items()})
"""


@pytest.mark.skipif(not (REF_LLAMA_CPP / "conversion" / "gpt_oss.py").exists(),
                    reason="llama.cpp reference converter not unpacked")
def test_mxfp4_hf_to_ggml_equals_llama_cpp_converter(tmp_path):
    pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    E, I, H = 2, 64, 96
    gub, gus = _random_mx(rng, (E, 2 * I), H // 32)
    db, ds = _random_mx(rng, (E, H), I // 32)
    np.savez(tmp_path / "in.npz", gate_up_blocks=gub, gate_up_scales=gus, down_blocks=db, down_scales=ds)
    script = tmp_path / "ref_repack.py"
    script.write_text(_REF_REPACK)
    env = dict(os.environ, NO_LOCAL_GGUF="1")  # the converter's own gguf-py is not needed here
    subprocess.run([sys.executable, str(script), str(REF_LLAMA_CPP), str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], check=True, env=env, timeout=300)
    ref = np.load(tmp_path / "out.npz")
    mine = {
        "gate": N.mxfp4_hf_to_ggml(gub[:, ::2], gus[:, ::2]),
        "up": N.mxfp4_hf_to_ggml(gub[:, 1::2], gus[:, 1::2]),
        "down": N.mxfp4_hf_to_ggml(db, ds),
    }
    for k, v in mine.items():
        assert int(ref[k + "_type"]) == int(gguf.GGMLQuantizationType.MXFP4)
        assert ref[k].dtype == np.uint8 and ref[k].shape == v.shape
        assert ref[k].tobytes() == v.tobytes(), k


# ------------------------------------------------------------------------------------ bitsandbytes

def test_nf4_table_properties():
    t = N.NF4_CODE
    assert t.dtype == np.float32 and t.shape == (16,)
    assert np.all(np.diff(t) > 0) and t[0] == -1.0 and t[15] == 1.0 and t[7] == 0.0
    # QLoRA's NF4: 8 positive and 7 negative levels; the bitsandbytes values
    assert float(t[8]) == pytest.approx(0.07958029955625534, abs=0) and float(t[1]) == np.float32(-0.6961928009986877)


def test_bnb_fp4_table_is_its_e2m1_variant():
    # bitsandbytes FP4: sign bit 3, exponent bits 2..1 (bias 2... code 0b001 = 0.0625 subnormal),
    # raw magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3 normalised by their max 12.
    raw = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    for code in range(16):
        want = np.float32(raw[code & 7]) / np.float32(12)
        want = -want if code & 8 else want
        assert N.BNB_FP4_CODE[code] == want and np.signbit(N.BNB_FP4_CODE[code]) == bool(code & 8)
    with pytest.raises(UnsupportedError):
        N.bnb_4bit_code("int4")


def test_decode_bnb_4bit_known_values_high_nibble_first():
    # shape (2, 40) = 80 values, blocksize 32: blocks of 32, 32 and a partial 16
    packed = np.zeros((40, 1), dtype=np.uint8)
    packed[0] = 0xF0  # element 0: code 15 (+1.0), element 1: code 0 (-1.0)
    packed[16] = 0x8E  # element 32: code 8, element 33: code 14
    packed[39] = 0x07  # element 78: code 0 (-1), element 79: code 7 (0.0)
    absmax = np.array([2.0, 0.5, 4.0], dtype=np.float32)
    out = N.decode_bnb_4bit(packed, absmax, quant_map=N.NF4_CODE, blocksize=32, shape=(2, 40))
    assert out.shape == (2, 40) and out.dtype == np.float32
    flat = out.reshape(-1)
    assert flat[0] == 2.0 and flat[1] == -2.0
    assert flat[32] == N.NF4_CODE[8] * np.float32(0.5) and flat[33] == N.NF4_CODE[14] * np.float32(0.5)
    assert flat[78] == -4.0 and flat[79] == 0.0
    # elements with byte 0x00: code 0 = -1 times the block's absmax
    assert flat[2] == -2.0 and flat[34] == -0.5 and flat[64] == -4.0
    # dtype rounding: values are rounded to bf16 like bitsandbytes' dequantize to bfloat16
    odd = np.array([1.0 + 2**-10], dtype=np.float32)
    b = N.decode_bnb_4bit(np.array([[0xFF]], dtype=np.uint8), odd, quant_map=N.NF4_CODE, blocksize=32,
                          shape=(2,), dtype="bfloat16")
    assert b.tolist() == [1.0, 1.0]
    with pytest.raises(FormatError):
        N.decode_bnb_4bit(packed[:-1], absmax, quant_map=N.NF4_CODE, blocksize=32, shape=(2, 40))
    with pytest.raises(FormatError):
        N.decode_bnb_4bit(packed, absmax[:2], quant_map=N.NF4_CODE, blocksize=32, shape=(2, 40))


def test_nested_absmax_hand_computed():
    dmap = N.bnb_dynamic_map()
    i_one = int(np.nonzero(dmap == 1.0)[0][0])
    i_zero = int(np.nonzero(dmap == 0.0)[0][0])
    i_neg = 0  # the most negative code
    q = np.array([i_one, i_zero, i_one, i_neg], dtype=np.uint8)
    nested = N.NestedAbsmax(absmax=np.array([0.5, 2.0], dtype=np.float32), quant_map=dmap, blocksize=2, offset=0.25)
    got = N.decode_bnb_nested_absmax(q, nested)
    want = [1.0 * 0.5 + 0.25, 0.0 * 0.5 + 0.25, 1.0 * 2.0 + 0.25, float(np.float32(dmap[0] * np.float32(2.0)) + np.float32(0.25))]
    assert got.tolist() == [np.float32(w) for w in want]
    assert dmap[0] < -0.99 and got[3] < 0  # the dynamic map spans [-1, 1]
    # and through decode_bnb_4bit: 4 blocks of 32, every code 15 (+1.0) -> each block's absmax
    packed = np.full((64, 1), 0xFF, dtype=np.uint8)
    out = N.decode_bnb_4bit(packed, q, quant_map=N.NF4_CODE, blocksize=32, shape=(128,), nested=nested)
    np.testing.assert_array_equal(out.reshape(4, 32), np.repeat(got[:, None], 32, axis=1))


def test_bnb_dynamic_map_matches_bitsandbytes_formula():
    torch = pytest.importorskip("torch")
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), in torch
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        m = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * m).tolist() + (-(10 ** (-6 + i)) * m).tolist()
    data += [0, 1.0]
    data.sort()
    ref = torch.tensor(data, dtype=torch.float32).numpy()
    got = N.bnb_dynamic_map()
    assert got.shape == (256,)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_bnb_encode_parse_decode_roundtrip(quant_type, nested):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((37, 96)) * 0.05).astype(np.float32)  # 3552 values: a partial last block
    t = N.encode_bnb_4bit(x, quant_type, 64, nested, prefix="model.layers.0.self_attn.q_proj.weight")
    w = "model.layers.0.self_attn.q_proj.weight"
    keys = {w, w + ".absmax", w + ".quant_map", w + f".quant_state.bitsandbytes__{quant_type}"}
    if nested:
        keys |= {w + ".nested_absmax", w + ".nested_quant_map"}
    assert set(t) == keys
    assert t[w].shape == (x.size // 2, 1) and t[w].dtype == np.uint8
    assert t[w + ".absmax"].dtype == (np.uint8 if nested else np.float32)
    meta = json.loads(t[w + f".quant_state.bitsandbytes__{quant_type}"].tobytes())
    assert meta["quant_type"] == quant_type and meta["blocksize"] == 64 and meta["shape"] == [37, 96]
    assert meta["dtype"] == "bfloat16" and (("nested_offset" in meta) == nested)
    st = N.parse_bnb_quant_state(t, "model.layers.0.self_attn.q_proj")
    assert st["quant_type"] == quant_type and st["shape"] == (37, 96) and (st["nested"] is not None) == nested
    y = N.decode_bnb_4bit_state(t, "model.layers.0.self_attn.q_proj.weight")
    assert y.shape == x.shape
    # each value is within half the largest code gap (times its block's absmax) of the input,
    # plus the bf16 rounding and, when nested, the 8-bit absmax error
    absmax = np.abs(np.pad(x.reshape(-1), (0, (-x.size) % 64)).reshape(-1, 64)).max(axis=1)
    code = np.sort(N.bnb_4bit_code(quant_type))
    half_gap = np.diff(code).max() / 2
    bound = np.repeat(absmax, 64)[: x.size].reshape(x.shape) * (half_gap + (0.02 if nested else 0)) * 1.01
    assert np.all(np.abs(y - x) <= bound)
    # encode is exact on decoded float32 data (non-nested: each block's absmax is one of its values)
    if not nested:
        y32 = N.decode_bnb_4bit_state(N.encode_bnb_4bit(x, quant_type, 64, False, dtype="float32"), "weight")
        np.testing.assert_array_equal(N.round_to_bf16(y32), y)
        t2 = N.encode_bnb_4bit(y32, quant_type, 64, False, dtype="float32")
        np.testing.assert_array_equal(N.decode_bnb_4bit_state(t2, "weight"), y32)


def test_parse_bnb_quant_state_errors():
    t = N.encode_bnb_4bit(np.ones((4, 64), dtype=np.float32), "nf4", 64, True, prefix="m.weight")
    broken = {k: v for k, v in t.items() if not k.endswith("nested_absmax")}
    with pytest.raises(FormatError, match="nested_absmax"):
        N.parse_bnb_quant_state(broken, "m")
    bad_json = dict(t)
    bad_json["m.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{not json", dtype=np.uint8)
    with pytest.raises(FormatError, match="JSON"):
        N.parse_bnb_quant_state(bad_json, "m")
    with pytest.raises(FormatError, match="missing"):
        N.parse_bnb_quant_state(t, "other")


def test_bnb_fp4_code_8_decodes_to_negative_zero_and_the_saved_map_is_checked():
    """bitsandbytes saves FP4's quant_map with +0.0 at code 8 but its kernels decode code 8 from the
    sign bit, to -0.0; a decoded base must carry the same bits (a zero's sign is a different bf16)."""
    x = np.zeros((2, 64), dtype=np.float32)
    x[0, 0], x[1, 5] = 1.0, -1.0
    t = N.encode_bnb_4bit(x, "fp4", 64, False, prefix="m.weight")
    saved = t["m.weight.quant_map"]
    assert saved[8] == 0 and not np.signbit(saved[8])  # as bitsandbytes saves it
    packed = t["m.weight"].reshape(-1)
    t["m.weight"] = np.full_like(t["m.weight"], 0x88)  # every code 8
    out = N.decode_bnb_4bit_state(t, "m")
    assert np.signbit(out).all() and (out == 0).all()
    t["m.weight"] = packed.reshape(-1, 1)
    damaged = dict(t)
    damaged["m.weight.quant_map"] = saved * np.float32(2)
    with pytest.raises(FormatError, match=r"m\.weight\.quant_map.*fp4"):
        N.decode_bnb_4bit_state(damaged, "m")


def test_decode_bnb_int8():
    w = np.array([[127, -127, 0], [64, 1, -1]], dtype=np.int8)
    scb = np.array([2.0, 127.0], dtype=np.float32)
    out = N.decode_bnb_int8(w, scb)
    assert out.dtype == np.float32
    # weight * SCB / 127, as float32 multiply by float32(1/127) (bitsandbytes' formula)
    r = np.float32(1) / np.float32(127)
    assert out.tolist() == [[np.float32(254) * r, np.float32(-254) * r, 0.0], [np.float32(8128) * r, 127 * r, -127 * r]]
    assert abs(out[0, 0] - 2.0) <= np.spacing(np.float32(2.0)) and out[1, 1] == np.float32(1.0)
    with pytest.raises(FormatError):
        N.decode_bnb_int8(w, scb[:1])


def test_bnb_against_bitsandbytes_if_installed():
    """Bit-exact against bitsandbytes' own quantize/dequantize (CPU). bitsandbytes is not a
    dependency; this runs where it is installed (pip install --no-deps bitsandbytes)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for dtype in (torch.bfloat16, torch.float32):
                x = (torch.randn(48, 128) * 0.05).to(dtype)
                q, state = bnb.functional.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type=quant_type)
                tensors = {"w.weight": q.numpy()}
                tensors.update({"w.weight." + k: v.numpy() for k, v in state.as_dict(packed=True).items()})
                ref = bnb.functional.dequantize_4bit(q, state).float().numpy()
                np.testing.assert_array_equal(N.decode_bnb_4bit_state(tensors, "w").view(np.uint32), ref.view(np.uint32))
                if not nested:  # non-nested encoding equals bitsandbytes' bytes exactly
                    enc = N.encode_bnb_4bit(x.float().numpy(), quant_type, 64, False, prefix="w.weight",
                                            dtype=str(dtype).split(".")[-1])
                    assert set(enc) == set(tensors)
                    for k in tensors:
                        np.testing.assert_array_equal(enc[k], tensors[k])
    w = torch.randint(-127, 128, (5, 7), dtype=torch.int8)
    scb = torch.rand(5) * 3
    np.testing.assert_array_equal(N.decode_bnb_int8(w.numpy(), scb.numpy()),
                                  bnb.functional.int8_vectorwise_dequant(w, scb).numpy())


# ------------------------------------------------------------------------------------ fixtures
# tests/quantized_layouts.py re-encodes a BF16 base into the layouts users meet; check that the
# result is what transformers (and bitsandbytes) read, so builds from it mean something.

def _raw_all(folder):
    from lora2gguf.safetensors_io import Checkpoint
    ck = Checkpoint.open(folder)
    return ck, {n: ck.raw(n) for n in ck.tensors}


def test_mxfp4_fixture_layout_and_transformers_reads_it(tiny_base, tmp_path):
    import quantized_layouts as QL
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mx_dir, bf_dir = QL.bf16_base_to_mxfp4(tiny_base, tmp_path)
    cfg = json.loads((tiny_base / "config.json").read_text())
    E, H, I = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    mx_cfg = json.loads((mx_dir / "config.json").read_text())
    assert mx_cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert "quantization_config" not in json.loads((bf_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (mx_dir / name).read_bytes() == (tiny_base / name).read_bytes()
    src_ck, src = _raw_all(tiny_base)
    mx_ck, mx = _raw_all(mx_dir)
    bf_ck, bf = _raw_all(bf_dir)
    assert set(bf) == set(src)
    n_layers = cfg["num_hidden_layers"]
    for n in range(n_layers):
        p = f"model.layers.{n}.mlp.experts."
        assert p + "gate_up_proj" not in mx and p + "down_proj" not in mx
        assert mx_ck.info(p + "gate_up_proj_blocks").dtype == "U8" and mx[p + "gate_up_proj_blocks"].shape == (E, 2 * I, H // 32, 16)
        assert mx_ck.info(p + "gate_up_proj_scales").dtype == "U8" and mx[p + "gate_up_proj_scales"].shape == (E, 2 * I, H // 32)
        assert mx[p + "down_proj_blocks"].shape == (E, H, I // 32, 16) and mx[p + "down_proj_scales"].shape == (E, H, I // 32)
        # blocks and scales sit in the shard that held the BF16 tensor (llama.cpp's converter pairs them in order)
        assert mx_ck.info(p + "gate_up_proj_blocks").path.name == src_ck.info(p + "gate_up_proj").path.name
        assert mx_ck.info(p + "down_proj_scales").path.name == src_ck.info(p + "down_proj").path.name
        for w in ("gate_up_proj", "down_proj"):
            decoded = N.decode_mxfp4_expert(mx[p + w + "_blocks"], mx[p + w + "_scales"])
            np.testing.assert_array_equal(N.f32_to_bf16_bits(decoded), bf[p + w])  # exact in bf16
            np.testing.assert_array_equal(N.bf16_bits_to_f32(bf[p + w]), decoded)
            orig = N.bf16_bits_to_f32(src[p + w])
            assert not np.array_equal(decoded, orig)  # really snapped...
            assert np.abs(decoded - orig).max() <= 0.25 * np.abs(orig).max()  # ...to nearby values
    for k, v in src.items():
        if ".mlp.experts.gate_up_proj" not in k and ".mlp.experts.down_proj" not in k or k.endswith("_bias"):
            assert mx[k].tobytes() == v.tobytes() and bf[k].tobytes() == v.tobytes(), k
    # transformers reads the MXFP4 folder (dequantizing on CPU) into exactly the snapped BF16 model
    m_mx = transformers.AutoModelForCausalLM.from_pretrained(str(mx_dir), dtype=torch.bfloat16)
    m_bf = transformers.AutoModelForCausalLM.from_pretrained(str(bf_dir), dtype=torch.bfloat16)
    sd_mx, sd_bf = m_mx.state_dict(), m_bf.state_dict()
    assert set(sd_mx) == set(sd_bf)
    for k in sd_bf:
        assert sd_mx[k].dtype == sd_bf[k].dtype and torch.equal(sd_mx[k], sd_bf[k]), k


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_bnb4_fixture_layout(tiny_base, tmp_path, quant_type, nested):
    import quantized_layouts as QL
    out = QL.bf16_base_to_bnb4(tiny_base, tmp_path / "bnb", quant_type, nested)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == quant_type and qc["bnb_4bit_use_double_quant"] is nested
    _, src = _raw_all(tiny_base)
    ck, q = _raw_all(out)
    n_quantized = 0
    for k, v in src.items():
        if ".self_attn." in k and k.endswith("_proj.weight"):
            n_quantized += 1
            assert ck.info(k).dtype == "U8" and q[k].shape == (v.size // 2, 1)
            assert (k + ".nested_absmax" in q) == nested
            assert ck.info(k + f".quant_state.bitsandbytes__{quant_type}").dtype == "U8"
            st = N.parse_bnb_quant_state(q, k)
            assert st["shape"] == v.shape and st["dtype"] == "bfloat16" and st["blocksize"] == 64
            y = N.decode_bnb_4bit_state(q, k)
            x = N.bf16_bits_to_f32(v)
            absmax = np.abs(x.reshape(-1, 64)).max(axis=1)
            half_gap = np.diff(np.sort(N.bnb_4bit_code(quant_type))).max() / 2
            bound = np.repeat(absmax, 64).reshape(x.shape) * (half_gap + (0.02 if nested else 0)) * 1.01
            assert np.all(np.abs(y - x) <= bound) and not np.array_equal(y, x)
        else:
            assert q[k].tobytes() == v.tobytes(), k  # experts, router, norms, embeddings, lm_head kept
    assert n_quantized == 4 * json.loads((tiny_base / "config.json").read_text())["num_hidden_layers"]


def test_bnb4_fixture_loads_in_transformers_if_bitsandbytes_installed(tiny_base, tmp_path):
    """transformers + bitsandbytes load the fixture as Linear4bit layers, and our numpy decode
    equals bitsandbytes' dequantize of what they loaded. Runs where bitsandbytes is installed."""
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    import quantized_layouts as QL
    out = QL.bf16_base_to_bnb4(tiny_base, tmp_path / "bnb", "nf4", True)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    _, q = _raw_all(out)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(m.model.layers[1].self_attn, proj)
        assert type(lin.weight).__name__ == "Params4bit"
        ref = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float().numpy()
        mine = N.decode_bnb_4bit_state(q, f"model.layers.1.self_attn.{proj}")
        np.testing.assert_array_equal(mine.view(np.uint32), ref.view(np.uint32))



# ---------------------------------------------------------------------------- float64, one rounding


def _neighbours_round(x: float, ft) -> int:
    """Bits of x rounded to nearest even in type ft, from exact rational comparisons."""
    from fractions import Fraction

    q = Fraction(x)
    c = ft(x)
    cands = {c, np.nextafter(c, ft(np.inf)), np.nextafter(c, ft(-np.inf))}
    view = np.uint16 if ft == np.float16 else np.uint32
    past_max = Fraction(2) ** (16 if ft == np.float16 else 128)  # where IEEE puts Inf for rounding

    def value(v):
        return Fraction(float(v)) if np.isfinite(v) else (past_max if v > 0 else -past_max)

    best = min(cands, key=lambda v: (abs(value(v) - q), int(np.array([v]).view(view)[0]) & 1))
    return int(np.array([best]).view(view)[0])


def _double_rounding_cases() -> np.ndarray:
    """float64 values just off bf16 and f16 ties: rounding through float32 lands on the tie."""
    base = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2.0 ** -130 * 1.5])
    eps = np.array([2.0 ** -40, -(2.0 ** -40), 2.0 ** -52, 0.0])
    vals = (base[:, None] * (1 + eps[None, :])).reshape(-1)
    return np.concatenate([vals, -vals])


def test_f64_to_bf16_rounds_once():
    rng = np.random.default_rng(11)
    x = np.concatenate([_double_rounding_cases(), rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000),
                        [0.0, -0.0, 3.3961e38, 3.4e38, 1e300, -1e300, 2.0 ** -140, 2.0 ** -134 * 1.5]])
    got = N.f64_to_bf16_bits(x)
    for v, g in zip(x.tolist(), got.tolist()):
        f32 = np.float32  # bf16 is the top half of float32: round the exact value among bf16 values
        from fractions import Fraction

        a = abs(Fraction(v))
        lo = np.float32(min(float(a), 3.4028234663852886e38))
        while Fraction(float(lo)) > a:
            lo = np.nextafter(lo, f32(0))
        lo_b = int(np.array([lo], f32).view(np.uint32)[0]) >> 16
        lo_v = Fraction(float(np.array([lo_b << 16], np.uint32).view(f32)[0]))
        hi_v = Fraction(2) ** 128 if lo_b == 0x7F7F else \
            Fraction(float(np.array([(lo_b + 1) << 16], np.uint32).view(f32)[0]))
        up = lo_v != a and ((hi_v - a) < (a - lo_v) or ((hi_v - a) == (a - lo_v) and lo_b & 1))
        want = (lo_b + up) | (0x8000 if v < 0 or (v == 0 and np.signbit(v)) else 0)
        assert g == want, (v, hex(g), hex(want))
    nan = N.f64_to_bf16_bits(np.array([np.nan, np.inf, -np.inf]))
    assert (nan[0] & 0x7F80) == 0x7F80 and (nan[0] & 0x7F) and nan[1:].tolist() == [0x7F80, 0xFF80]


def test_f64_to_f16_rounds_once():
    """numpy converts float64 to half directly; held to it here, including values whose float32
    rounding lands on a half tie and half's subnormals."""
    rng = np.random.default_rng(12)
    x = np.concatenate([_double_rounding_cases(), rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 5, 2000),
                        [2.0 ** -25 * (1 + 2.0 ** -40), 2.0 ** -25, 65519.99, 65520.0]])
    got = N.f64_to_f16_bits(x)
    for v, g in zip(x.tolist(), got.tolist()):
        assert g == _neighbours_round(v, np.float16), (v, hex(g))
    # a whole array (numpy's vectorized loop) agrees with the scalar path
    np.testing.assert_array_equal(N.f64_to_f16_bits(np.tile(x, 3)), np.tile(got, 3))


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_bits_finite_on_every_pattern(dtype):
    """The compiled one-pass test (contiguous arrays) and the two-reduction numpy test agree with
    the exponent-field definition on all 65536 patterns, one pattern at a time in a field of
    finite values, and on strided views."""
    from lora2gguf import kernel

    assert kernel.available(), kernel.status()  # CI builds it: both routes are tested
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp = N.HALF_EXPONENT[dtype]
    nonfinite = (every & exp) == exp
    field_ = np.full(7, 0x3C00 if dtype == "f16" else 0x3F80, np.uint16)
    for bits, bad in zip(every, nonfinite):
        field_[3] = bits
        assert N.half_bits_finite(field_, dtype) is (not bad), hex(int(bits))
        assert N._half_bits_finite_numpy(field_, exp) is (not bad), hex(int(bits))
        assert kernel.half_nonfinite(field_, exp) is bool(bad), hex(int(bits))
    long = np.full(100_003, field_[0], np.uint16)  # past any vector width, a pattern at the tail
    assert N.half_bits_finite(long, dtype)
    long[-1] = exp
    assert not N.half_bits_finite(long, dtype)
    assert N.half_bits_finite(every[~nonfinite].reshape(-1, 2)[:, ::-1].T, dtype)
    assert not N.half_bits_finite(every.reshape(256, 256)[::3, 1::2], dtype)
    assert N.half_bits_finite(np.empty((0, 4), np.uint16), dtype)
    with pytest.raises(FormatError, match="uint16"):
        N.half_bits_finite(np.zeros(3, np.float32), dtype)
