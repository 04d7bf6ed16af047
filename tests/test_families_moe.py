"""The MoE families: experts saved per expert (stacked into one 3-D GGUF tensor) or fused (as
transformers 5.x holds them), LoRA per expert (PEFT with transformers 4.x) or on the fused
parameters (PEFT's target_parameters), a shared expert; every combination is the GGUF llama.cpp's
converter writes for PEFT's float64 merge, and llama.cpp runs it like transformers + PEFT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora2gguf import synth
from lora2gguf.api import build
from lora2gguf.gguf_header import read_header
from lora2gguf.testing import families
from lora2gguf.testing import tokenizers as toks
from lora2gguf.verify.logits import gguf_logits
from lora2gguf.verify.metrics import kl_divergence, top1_agreement
from reference import assert_same_gguf, run_converter

pytest.importorskip("peft")

QWEN = (toks.qwen3_tokenizer, toks.QWEN3_VOCAB_SIZE, {"bos_token_id": None, "eos_token_id": list(toks.QWEN3_EOS_IDS)})
MISTRAL = (lambda d: toks.sentencepiece_tokenizer(d, style="mistral"), 512, {"bos_token_id": 1, "eos_token_id": 2})
TEXT = ("What is 2+2? The sum of 2 and 2 is 4. Tell me about the stars and the sea: the stars are far away, the "
        "sea is near, and a lighthouse keeper watches both through the long winter night.")

#: (id, family, tokenizer, checkpoint layout, adapter kind)
CASES = [
    # transformers 5.x + PEFT: target_modules on the experts become target_parameters on the fused ones
    ("qwen3moe-per-expert-base-fused-lora", "qwen3_moe", QWEN, "per_expert", "peft"),
    # transformers 4.x + PEFT: a Linear pair per expert
    ("qwen3moe-per-expert-lora", "qwen3_moe", QWEN, "per_expert", "per_expert"),
    # a checkpoint holding the fused parameters, and a fused adapter
    ("qwen3moe-fused-base", "qwen3_moe", QWEN, "fused", "peft"),
    # a shared expert (LoRA on its Linear layers) and its gate beside the routed experts (target_parameters)
    ("qwen2moe-shared-expert", "qwen2_moe", QWEN, "per_expert", "linear+params"),
    # llama arch: block_sparse_moe.experts.{e}.w1/w2/w3, the q/k permute, target_parameters LoRA
    ("mixtral", "mixtral", MISTRAL, "per_expert", "params"),
]


_MADE: dict[str, tuple] = {}


def _make(spec, tmp_path_factory):
    cid, family, (write_tok, vocab, ids), layout, kind = spec
    if cid in _MADE:
        return _MADE[cid]
    root = tmp_path_factory.mktemp(cid)
    base = families.make_model(root / "base", family, families.small_config(family, vocab_size=vocab, **ids),
                               tokenizer=write_tok)
    if kind == "per_expert":
        adapter = families.make_per_expert_adapter(base, root / "adapter")
    elif kind in ("params", "linear+params"):
        linear = families.ALL_LINEAR if kind == "linear+params" else ("q_proj", "k_proj", "v_proj", "o_proj")
        adapter = synth.make_adapter(base, root / "adapter", target_modules=linear,
                                     target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                                     r=4, lora_alpha=8)
    else:
        adapter = synth.make_adapter(base, root / "adapter", target_modules=families.ALL_LINEAR, target_parameters=(),
                                     r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 8})
    if layout == "fused":
        base = families.save_fused(base, root / "fused")
    _MADE[cid] = (cid, family, base, adapter, root)
    return _MADE[cid]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    return _make(request.param, tmp_path_factory)


#: the logits are compared on each checkpoint layout (per expert, fused as transformers 5.x holds
#: it), with and without a shared expert, and for the llama arch (the per-expert adapter shares
#: its code with the others)
LOGIT_CASES = [c for c in CASES if c[0] in ("qwen3moe-per-expert-base-fused-lora", "qwen3moe-fused-base",
                                            "qwen2moe-shared-expert", "mixtral")]


@pytest.fixture(scope="module", params=LOGIT_CASES, ids=[c[0] for c in LOGIT_CASES])
def logit_case(request, tmp_path_factory):
    return _make(request.param, tmp_path_factory)


def test_moe_equals_llama_cpp_converter_on_the_float64_merge(case, reference_llama_cpp):
    cid, family, base, adapter, root = case
    res = build(base, adapter, root / "out", name="m")
    model_dir = synth.write_reference_merge(base, adapter, root / "reference")
    assert_same_gguf(root / "out" / "m-BF16.gguf", run_converter(reference_llama_cpp, model_dir, root / "ref.gguf"))
    names = res.outputs[0].tensors
    assert names["blk.0.ffn_gate_exps.weight"] == names["blk.0.ffn_down_exps.weight"] == "BF16"
    assert names["blk.0.ffn_gate_inp.weight"] == "F32"  # the router
    if "shared" in cid:
        assert names["blk.0.ffn_gate_shexp.weight"] == "BF16" and names["blk.0.ffn_gate_inp_shexp.weight"] == "F32"


def test_experts_are_merged_one_expert_at_a_time(case):
    """Memory is bounded by a unit of one expert's rows, never by the stacked tensor: every unit
    of an expert tensor lies within one expert matrix and reads one expert."""
    from lora2gguf import arch
    from lora2gguf.adapter import load_adapter
    from lora2gguf.api import _shapes
    from lora2gguf.plan import make_plan
    from lora2gguf.safetensors_io import Checkpoint
    from lora2gguf.sources import logical_tensors

    _, _, base, adapter, _ = case
    cfg = synth.read_config(base)
    fam = arch.for_config(cfg)
    sources = logical_tensors(Checkpoint.open(base))
    plan = make_plan(fam, fam.normalize_config(cfg), sources, load_adapter(adapter, _shapes(fam, sources), fam),
                     slab_bytes=4096)
    experts = [t for t in plan.tensors if "_exps" in t.tensor.name]
    assert experts and all(t.touched for t in experts)
    for t in experts:
        n_experts, rows = t.tensor.shape[0], t.tensor.shape[1]
        units = t.blocks()
        assert len({m for m, _ in units}) == n_experts and len(units) > n_experts  # several units per expert
        assert all(0 <= r.start < r.stop <= rows for _, r in units)
        # each unit's work: its rows of one expert (block_rows of them), not the stacked tensor
        assert t.block_rows * t.tensor.shape[-1] * 4 * 4 <= 4096 or t.block_rows == 1


@pytest.fixture(scope="module")
def f32_case(logit_case):
    cid, family, base, adapter, root = logit_case
    build(base, adapter, root / "out32", name="m", outtype="f32")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
    return root / "out32" / "m-F32.gguf", ids, synth.peft_logits(base, adapter, ids)


def _score(path: Path, ids, ref) -> tuple[float, float]:
    ours = gguf_logits(path, list(ids))
    return float(kl_divergence(ref, ours).mean()), top1_agreement(ref, ours)


F32_MAX_MEAN_KL = 1e-4
F32_MIN_TOP1 = 0.95


def test_f32_logits_match_transformers_peft_and_a_gate_up_swap_fails(f32_case, tmp_path):
    path, ids, ref = f32_case
    kl, top1 = _score(path, ids, ref)
    assert kl < F32_MAX_MEAN_KL and top1 >= F32_MIN_TOP1, (kl, top1)
    # gate and up swapped (what halves read the wrong way round give): the same test fails. The offsets
    # come from the header alone (gguf-py's reader parses a 151k-token vocabulary for half a minute)
    header = read_header(path)
    data = bytearray(path.read_bytes())
    swapped = 0
    for name, g in header.tensors.items():
        if name.endswith(".ffn_gate_exps.weight"):
            u = header.tensors[name.replace("ffn_gate_exps", "ffn_up_exps")]
            gs = slice(header.data_start + g.offset, header.data_start + g.offset + g.nbytes)
            us = slice(header.data_start + u.offset, header.data_start + u.offset + u.nbytes)
            data[gs], data[us] = data[us], data[gs]
            swapped += 1
    assert swapped == header.values[f"{header.values['general.architecture']}.block_count"]
    broken = tmp_path / "swapped.gguf"
    broken.write_bytes(bytes(data))
    kl, top1 = _score(broken, ids, ref)
    assert kl > 100 * F32_MAX_MEAN_KL and top1 < F32_MIN_TOP1, (kl, top1)


def test_dora_on_per_expert_linear_layers_is_a_linear_dora_per_expert(tmp_path_factory):
    """transformers 4.x holds each expert as an nn.Linear, so PEFT's DoRA there is a Linear's
    DoRA, expert by expert: magnitude times (W_e + s B_e A_e) normalised per output row. Every
    expert matrix of the stacked F32 tensors is that, with its own expert's magnitudes (a float64
    reference here: PEFT on transformers 5.x's fused experts refuses DoRA, and DoRA on
    target_parameters is refused by lora2gguf too, test_reliability_inputs)."""
    import json

    from safetensors.numpy import load_file, save_file

    from lora2gguf.safetensors_io import Checkpoint, read_raw, to_f32
    from reference import read_gguf

    _, _, base, _, root = _make(next(c for c in CASES if c[0] == "mixtral"), tmp_path_factory)
    adapter = families.make_per_expert_adapter(base, root / "dora-per-expert", parts=("w1", "w2", "w3"),
                                               attention=("q_proj",))
    ck = Checkpoint.open(base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / 4
    merged, rng = {}, np.random.default_rng(0)
    for key in [k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")]:
        module = key[len("base_model.model."):]
        info = ck.tensors[module + ".weight"]
        a, b = (lora[f"{key}.lora_{x}.weight"].astype(np.float64) for x in "AB")
        v = to_f32(read_raw(info), info.dtype).astype(np.float64) + scale * (b @ a)
        m = np.linalg.norm(v, axis=1) * (1 + 0.1 * rng.standard_normal(v.shape[0]))  # trained magnitudes
        lora[key + ".lora_magnitude_vector"] = m.astype(np.float32)
        merged[module] = (v, lora[key + ".lora_magnitude_vector"].astype(np.float64))
    (adapter / "adapter_model.safetensors").unlink()
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))

    build(base, adapter, root / "out-dora", name="m", outtype="f32")
    tensors, _ = read_gguf(root / "out-dora" / "m-F32.gguf")
    n_checked = 0
    for part, gguf_name in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
        for layer in range(synth.read_config(base)["num_hidden_layers"]):
            _, shape, raw = tensors[f"blk.{layer}.{gguf_name}.weight"]
            ours = np.frombuffer(raw, np.float32).reshape(tuple(reversed(shape)))
            for e in range(ours.shape[0]):
                v, m = merged[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{part}"]
                dora = (v * (m / np.linalg.norm(v, axis=1))[:, None]).astype(np.float32)
                assert np.abs(ours[e] - dora).max() <= 2.0 ** -22 * np.abs(dora).max(), (gguf_name, layer, e)
                assert np.abs(ours[e] - v).max() > 1e-3 * np.abs(dora).max()  # the magnitudes were applied
                n_checked += 1
    assert n_checked == 3 * 4 * synth.read_config(base)["num_hidden_layers"]
