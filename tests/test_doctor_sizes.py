"""doctor's size estimates against real files: llama.cpp's reference converter writes the BF16 GGUF
of a base, llama.cpp's quantizer (through llama-cpp-python) the Q8_0 and Q4_K_M ones, and the
estimates doctor makes from the headers alone must be within 1% of their sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora2gguf import doctor, synth

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fixture", ["k256_base"])  # tiny_base (fallback types) measured: within 0.2%
def test_estimates_match_llama_cpp_files(request, reference_llama_cpp, tmp_path, fixture):
    pytest.importorskip("llama_cpp")
    from lora2gguf.quantize import quantize

    base = request.getfixturevalue(fixture)
    bf16 = tmp_path / "m-BF16.gguf"
    r = subprocess.run([sys.executable, str(reference_llama_cpp / "convert_hf_to_gguf.py"), str(base),
                        "--outfile", str(bf16), "--outtype", "bf16"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sizes = {"BF16": bf16.stat().st_size}
    for q in ("Q8_0", "Q4_K_M"):
        out = tmp_path / f"m-{q}.gguf"
        quantize(bf16, out, q, nthread=2)
        sizes[q] = out.stat().st_size
    adapter = synth.make_adapter_numpy(base, tmp_path / "adapter", target_parameters=())
    report = doctor.run(base, adapter, outputs=tuple(sizes), free_bytes=10**12)
    est = {o.name: o.bytes for o in report.resources.outputs}
    for name, size in sizes.items():
        assert abs(est[name] - size) / size < 0.01, (name, est[name], size)
    assert report.resources.bytes_needed == sum(est.values())
