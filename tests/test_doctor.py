"""doctor: one case per finding, a clean pair that triggers nothing, and the stable JSON schema.

Fixtures are real files: the session's tiny GPT-OSS base and PEFT adapter (conftest), variants of
them written here (tokenizer edits, adapters saved with zero / NaN weights, quantized layouts made
by tests/quantized_layouts.py, headers of FP8 / GPTQ / AWQ / compressed-tensors checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora2gguf import doctor, o200k, synth
from lora2gguf.doctor import checks, findings as F
from lora2gguf.doctor.render import render_text
from lora2gguf.safetensors_io import Checkpoint

BASE_NAME_ONLY = ("config.json", "generation_config.json")


# --------------------------------------------------------------------------- helpers


def codes(report) -> set[str]:
    return {f.code for f in report.findings}


def one(report, code):
    found = report.by_code(code)
    assert len(found) == 1, f"expected one {code}, got {[f.code for f in report.findings]}"
    return found[0]


def blockers(report) -> set[str]:
    return {f.code for f in report.findings if f.severity == F.BLOCKER}


def warnings_(report) -> set[str]:
    return {f.code for f in report.findings if f.severity == F.WARNING}


def copy_base(src: Path, dest: Path) -> Path:
    """A writable copy of a base folder (shards hard-linked: they are never modified)."""
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix == ".safetensors":
            try:
                (dest / p.name).hardlink_to(p)
            except OSError:
                shutil.copyfile(p, dest / p.name)
        else:
            shutil.copyfile(p, dest / p.name)
    return dest


def adapter_from(base: Path, dest: Path, **kw) -> Path:
    return synth.make_adapter_numpy(base, dest, **kw)


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, str(path))


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(path))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def np_adapter(tiny_base, tmp_path_factory) -> Path:
    """A numpy-written adapter on the tiny base (attention + experts), tokenizer copied."""
    return adapter_from(tiny_base, tmp_path_factory.mktemp("np_adapter"))


def variant_adapter(tiny_base, tmp_path, tokenizer=None, **kw) -> Path:
    """An adapter whose tokenizer files are the base's, changed by ``tokenizer(dest)``."""
    return adapter_from(tiny_base, tmp_path / "adapter", tokenizer=tokenizer or "same", **kw)


# --------------------------------------------------------------------------- the clean pair


def test_clean_pair_triggers_nothing(tiny_base, tiny_adapter, tmp_path):
    report = doctor.run(tiny_base, tiny_adapter, out_dir=tmp_path / "out", free_bytes=10**12)
    assert blockers(report) == set() and warnings_(report) == set(), report.to_json()
    assert report.exit_code == 0
    assert report.architecture == "gpt_oss"
    assert report.tokenizer_choice.source == "adapter" and report.tokenizer_choice.dir == Path(tiny_adapter)
    summary = one(report, "ADAPTER_SUMMARY").data
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    layers = synth.read_config(tiny_base)["num_hidden_layers"]
    assert summary["pairs_matched"] == layers * (len(cfg["target_modules"]) + len(cfg["target_parameters"]))
    assert summary["r"] == cfg["r"] and summary["lora_alpha"] == cfg["lora_alpha"]
    assert summary["scale"] == pytest.approx(cfg["lora_alpha"] / cfg["r"])
    assert summary["touches_experts"] is True
    versions = one(report, "VERSIONS").data
    assert versions["llama_knows_arch"] is True and versions["gguf_arch"] == "gpt-oss"
    assert "TOKENIZER_SAME" in codes(report)
    assert report.blocking() == []


# --------------------------------------------------------------------------- tokenizer


def test_changed_template_is_a_warning_with_a_diff(tiny_base, tmp_path):
    def edit(dest: Path):
        tpl = (dest / "chat_template.jinja").read_text()
        (dest / "chat_template.jinja").write_text(tpl.replace("Knowledge cutoff: ", "Knowledge cutoff (xyrus): "))

    ad = variant_adapter(tiny_base, tmp_path, edit)
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "TEMPLATE_DIFFERS")
    assert f.severity == F.WARNING
    assert "+" in f.what and "Knowledge cutoff (xyrus)" in f.what and "--- base chat template" in f.what
    assert "TOKENIZER_MISMATCH" not in codes(report)
    assert blockers(report) == set() and report.exit_code == 1
    assert report.tokenizer_choice.source == "adapter" and "template" in report.tokenizer_choice.reason
    files = report.tokenizer_diff.files
    assert files["chat_template.jinja"]["same"] is False and files["tokenizer.json"]["same"] is True


def test_extra_token_is_a_blocker_with_hashes_and_ids(tiny_base, tmp_path):
    def edit(dest: Path):
        o200k.write_tokenizer(dest, extra_tokens=["<|xyrus|>"])

    ad = variant_adapter(tiny_base, tmp_path, edit)
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "TOKENIZER_MISMATCH")
    assert f.severity == F.BLOCKER
    d = f.data["diff"]
    assert {"token": "<|xyrus|>", "base_id": None, "adapter_id": o200k.VOCAB_SIZE, "base_special": None,
            "adapter_special": True} in d["added_tokens"]
    assert d["vocab_size"] == {"base": o200k.VOCAB_SIZE, "adapter": o200k.VOCAB_SIZE + 1}
    assert d["n_changed_ids"] == 1 and d["changed_ids"][0]["id"] == o200k.VOCAB_SIZE
    # the hashes shown are the files' real MD5 and SHA-256
    for name in ("tokenizer.json", "tokenizer_config.json"):
        for side, folder in (("base", tiny_base), ("adapter", ad)):
            raw = (folder / name).read_bytes()
            assert d["files"][name][side]["md5"] == hashlib.md5(raw).hexdigest()
            assert d["files"][name][side]["sha256"] == hashlib.sha256(raw).hexdigest()
            assert hashlib.md5(raw).hexdigest() in f.what
    assert d["files"]["tokenizer.json"]["same"] is False
    # the id is beyond the embedding rows
    big = one(report, "TOKENIZER_TOO_LARGE")
    assert big.data["ids_past_end"] == [{"token": "<|xyrus|>", "id": o200k.VOCAB_SIZE}]
    assert report.exit_code == 2
    assert report.tokenizer_choice.source == "adapter" and "TOKENIZER_MISMATCH" in report.tokenizer_choice.reason
    assert {x.code for x in report.blocking({"TOKENIZER_MISMATCH"})} == {"TOKENIZER_TOO_LARGE"}


def test_swapped_ids_and_merges_are_a_blocker(tiny_base, tmp_path):
    def hook(tj):
        v = tj["model"]["vocab"]
        a, b = "hello", "world"
        v[a], v[b] = v[b], v[a]
        tj["model"]["merges"] = tj["model"]["merges"][:-1]

    ad = variant_adapter(tiny_base, tmp_path, lambda dest: o200k.write_tokenizer(dest, tokenizer_json_hook=hook))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    d = one(report, "TOKENIZER_MISMATCH").data["diff"]
    assert d["n_changed_ids"] == 2
    assert {c["base"] for c in d["changed_ids"]} == {"hello", "world"}
    assert d["merges"]["same"] is False and d["merges"]["adapter"] == d["merges"]["base"] - 1
    assert d["merges"]["first_difference"] == d["merges"]["base"] - 1


def test_resized_embeddings_turn_the_id_change_into_a_warning(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, extra_tokens=["<|xyrus|>"]))
    tensors = load_tensors(ad / "adapter_model.safetensors")
    h = synth.read_config(tiny_base)["hidden_size"]
    for key in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        tensors[key] = np.ones((o200k.VOCAB_SIZE + 1, h), np.float32)  # both resized, as PEFT saves them
    save_tensors(ad / "adapter_model.safetensors", tensors)
    edit_json(ad / "adapter_config.json", modules_to_save=["embed_tokens", "lm_head"])
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert "TOKENIZER_RESIZED" in warnings_(report)
    assert "TOKENIZER_MISMATCH" not in codes(report) and "TOKENIZER_TOO_LARGE" not in codes(report)
    # merged: doctor says what the adapter replaces, and nothing blocks
    f = one(report, "ADAPTER_FULL_WEIGHTS")
    assert f"resized: {o200k.VOCAB_SIZE} -> {o200k.VOCAB_SIZE + 1} rows" in f.what
    assert blockers(report) == set()


def test_resized_embedding_without_its_lm_head_is_a_blocker(tiny_base, tmp_path):
    """Only embed_tokens resized (an adapter no training run writes): the rows would disagree."""
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, extra_tokens=["<|xyrus|>"]))
    tensors = load_tensors(ad / "adapter_model.safetensors")
    h = synth.read_config(tiny_base)["hidden_size"]
    tensors["base_model.model.model.embed_tokens.modules_to_save.default.weight"] = np.ones(
        (o200k.VOCAB_SIZE + 1, h), np.float32)
    save_tensors(ad / "adapter_model.safetensors", tensors)
    edit_json(ad / "adapter_config.json", modules_to_save=["embed_tokens"])
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "ADAPTER_BASE_MISMATCH")
    assert "lm_head.weight" in f.what and "rows" in f.what


def test_special_token_settings_are_a_warning(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, eos_token="<|end|>"))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "TOKENIZER_DIFFERS")
    assert f.data["diff"]["specials"]["eos_token"] == {"base": "<|return|>", "adapter": "<|end|>",
                                                      "base_id": 200002, "adapter_id": 200007}
    eos = one(report, "EOS_NOT_ANSWER_END")
    assert eos.severity == F.WARNING and eos.data["eos_id"] == 200007
    assert blockers(report) == set() and report.exit_code == 1


def test_tokenizer_resaved_by_a_trainer_is_equivalent(tiny_base, tmp_path):
    pytest.importorskip("transformers")
    ad = adapter_from(tiny_base, tmp_path / "adapter", tokenizer="resaved")  # tokenizer.save_pretrained, as TRL does
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "TOKENIZER_EQUIVALENT")
    assert f.severity == F.INFO and not f.data["diff"]["settings"] and not f.data["diff"]["specials"]
    assert not ({"TOKENIZER_DIFFERS", "TOKENIZER_MISMATCH", "TEMPLATE_DIFFERS"} & report.codes)
    assert report.exit_code == 0 and report.tokenizer_choice.source == "adapter"


def test_adapter_without_tokenizer_uses_the_base(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, None)
    for p in ad.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            p.unlink()
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert one(report, "TOKENIZER_FROM_BASE").severity == F.INFO
    assert report.tokenizer_choice.source == "base" and report.tokenizer_choice.dir == Path(tiny_base)
    assert report.exit_code == 0


def test_no_tokenizer_anywhere_is_a_blocker(tiny_base, tmp_path):
    base = copy_base(tiny_base, tmp_path / "base")
    for p in base.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            p.unlink()
    ad = adapter_from(base, tmp_path / "adapter", tokenizer="none")
    report = doctor.run(base, ad, free_bytes=10**12)
    assert "TOKENIZER_MISSING" in blockers(report)
    assert report.tokenizer_choice.source == "none"


def test_unreadable_tokenizer_is_a_blocker(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: (d / "tokenizer.json").write_text("{not json"))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "TOKENIZER_INVALID")
    assert str(ad / "tokenizer.json") in f.what and "not valid JSON" in f.what


# --------------------------------------------------------------------------- chat format


def test_template_without_harmony_or_eog_is_a_blocker(tiny_base, tmp_path):
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, chat_template=chatml))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert {"CHAT_TEMPLATE_WRONG_FORMAT", "CHAT_TEMPLATE_NO_EOG"} <= blockers(report)
    wrong = one(report, "CHAT_TEMPLATE_WRONG_FORMAT")
    assert wrong.data["missing"] == ["<|channel|>", "<|message|>"] and wrong.data["format"] == "harmony"
    assert "TEMPLATE_DIFFERS" in warnings_(report)
    # the code's first name (it named the format) is still accepted, in any case, by --accept
    old = {"chat_template_not_harmony", "CHAT_TEMPLATE_NO_EOG"}
    assert not report.blocking(old) and report.blocking({"CHAT_TEMPLATE_NO_EOG"}) == [wrong]
    accepted = {f["code"] for f in report.to_dict(old)["findings"] if f["accepted"]}
    assert accepted == {"CHAT_TEMPLATE_WRONG_FORMAT", "CHAT_TEMPLATE_NO_EOG"}
    assert "CHAT_TEMPLATE_WRONG_FORMAT (accepted)" in render_text(report, accepted=old, width=140)


def test_eos_that_is_plain_text_is_a_blocker(tiny_base, tmp_path):
    def edit(dest: Path):
        edit_json(dest / "tokenizer_config.json", eos_token="hello")
        edit_json(dest / "special_tokens_map.json", eos_token="hello")

    ad = variant_adapter(tiny_base, tmp_path, edit)
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "EOS_NOT_EOG")
    assert f.severity == F.BLOCKER and f.data["eos_token"] == "hello" and "not a special token" in f.what
    assert "<|return|>" in f.fix


def test_eos_endoftext_is_only_a_warning(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, eos_token="<|endoftext|>"))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert "EOS_NOT_ANSWER_END" in warnings_(report) and "EOS_NOT_EOG" not in codes(report)


def test_missing_eog_token_is_a_blocker(tiny_base, tmp_path):
    def hook(tj):
        tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|call|>"]

    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, tokenizer_json_hook=hook))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert one(report, "EOG_TOKEN_MISSING").data["missing"] == ["<|call|>"]


def test_missing_chat_template_is_a_blocker(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: (d / "chat_template.jinja").unlink())
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert "CHAT_TEMPLATE_MISSING" in blockers(report)


def test_template_in_tokenizer_config_is_found(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, template_in_config=True))
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    assert not ({"CHAT_TEMPLATE_MISSING", "CHAT_TEMPLATE_WRONG_FORMAT", "TEMPLATE_DIFFERS"} & codes(report))
    assert report.inspection.adapter.tokenizer.chat_template_source == "tokenizer_config.json"


# --------------------------------------------------------------------------- quantized bases


@pytest.fixture(scope="module")
def mxfp4_pair(tiny_base, tmp_path_factory):
    from quantized_layouts import bf16_base_to_mxfp4
    return bf16_base_to_mxfp4(tiny_base, tmp_path_factory.mktemp("mxfp4"))


def test_mxfp4_base_is_named_and_the_adapter_still_matches(mxfp4_pair, tiny_adapter):
    mx, bf = mxfp4_pair
    report = doctor.run(mx, tiny_adapter, free_bytes=10**12)
    f = one(report, "BASE_MXFP4")
    assert f.severity == F.INFO and f.data["quant_method"] == "mxfp4" and f.data["experts_only"] is True
    layers = synth.read_config(mx)["num_hidden_layers"]
    assert len(f.data["tensors"]) == 2 * layers
    assert all(n.endswith(("gate_up_proj_blocks", "down_proj_blocks")) for n in f.data["tensors"])
    assert "ADAPTER_BASE_MISMATCH" not in codes(report) and blockers(report) == set()
    # the logical shapes are exactly the BF16 checkpoint's
    assert report.inspection.base.logical_shapes == {n: t.shape for n, t in Checkpoint.open(bf).tensors.items()}
    assert f.data["keep_mxfp4_possible"] is False  # tiny_adapter changes the experts


def test_mxfp4_with_attention_only_adapter_can_keep_mxfp4(mxfp4_pair, tmp_path):
    mx, _ = mxfp4_pair
    ad = adapter_from(mx, tmp_path / "adapter", target_parameters=())
    f = one(doctor.run(mx, ad, free_bytes=10**12), "BASE_MXFP4")
    assert f.data["keep_mxfp4_possible"] is True and "--keep-mxfp4 applies" in f.fix


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_bnb_4bit_base_is_a_blocker(tiny_base, tiny_adapter, tmp_path, quant_type, nested):
    from quantized_layouts import bf16_base_to_bnb4
    b4 = bf16_base_to_bnb4(tiny_base, tmp_path / "bnb", quant_type=quant_type, nested=nested)
    report = doctor.run(b4, tiny_adapter, free_bytes=10**12)
    f = one(report, "BASE_BNB_4BIT")
    assert f.severity == F.BLOCKER and f.data["quant_types"] == [quant_type] and f.data["nested"] is nested
    layers = synth.read_config(b4)["num_hidden_layers"]
    assert len(f.data["tensors"]) == 4 * layers and "self_attn.q_proj.weight" in f.what
    assert "BF16" in f.fix and "--accept BASE_BNB_4BIT" in f.fix
    assert "ADAPTER_BASE_MISMATCH" not in codes(report)
    assert report.inspection.base.logical_shapes == {n: t.shape for n, t in Checkpoint.open(tiny_base).tensors.items()}
    assert report.blocking({"BASE_BNB_4BIT"}) == []


def _quantized_folder(tiny_base: Path, dest: Path, tensors: dict[str, np.ndarray], qc: dict | None) -> Path:
    """A base folder with the tiny base's config (plus quantization_config) and these tensors."""
    dest.mkdir()
    cfg = synth.read_config(tiny_base)
    if qc is not None:
        cfg["quantization_config"] = qc
    (dest / "config.json").write_text(json.dumps(cfg))
    save_tensors(dest / "model.safetensors", tensors)
    return dest


def _fp8_tensors():
    import torch  # safetensors' numpy API has no float8; write it through torch
    w = torch.zeros((64, 64), dtype=torch.float8_e4m3fn)
    return {"model.layers.0.self_attn.q_proj.weight": w,
            "model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones((1, 1))}


QUANTIZED_CASES = {
    "BASE_GPTQ": ({"model.layers.0.self_attn.q_proj.qweight": np.zeros((8, 64), np.int32),
                   "model.layers.0.self_attn.q_proj.qzeros": np.zeros((1, 8), np.int32),
                   "model.layers.0.self_attn.q_proj.scales": np.ones((1, 64), np.float16),
                   "model.layers.0.self_attn.q_proj.g_idx": np.zeros((64,), np.int32)},
                  {"quant_method": "gptq", "bits": 4, "group_size": 128}),
    "BASE_AWQ": ({"model.layers.0.self_attn.q_proj.qweight": np.zeros((64, 8), np.int32),
                  "model.layers.0.self_attn.q_proj.qzeros": np.zeros((1, 8), np.int32),
                  "model.layers.0.self_attn.q_proj.scales": np.ones((1, 64), np.float16)},
                 {"quant_method": "awq", "bits": 4, "version": "gemm"}),
    "BASE_COMPRESSED_TENSORS": ({"model.layers.0.self_attn.q_proj.weight_packed": np.zeros((64, 8), np.int32),
                                 "model.layers.0.self_attn.q_proj.weight_shape": np.array([64, 64], np.int64),
                                 "model.layers.0.self_attn.q_proj.weight_scale": np.ones((64, 1), np.float16)},
                                {"quant_method": "compressed-tensors", "format": "pack-quantized"}),
    "BASE_BNB_8BIT": ({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.int8),
                       "model.layers.0.self_attn.q_proj.SCB": np.ones((64,), np.float32)},
                      {"quant_method": "bitsandbytes", "load_in_8bit": True}),
}


@pytest.mark.parametrize("code", sorted(QUANTIZED_CASES) + ["BASE_FP8"])
def test_other_quantized_bases_are_blockers(tiny_base, np_adapter, tmp_path, code):
    if code == "BASE_FP8":
        pytest.importorskip("torch")
        from safetensors.torch import save_file
        dest = tmp_path / "base"
        dest.mkdir()
        cfg = synth.read_config(tiny_base)
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (dest / "config.json").write_text(json.dumps(cfg))
        save_file(_fp8_tensors(), str(dest / "model.safetensors"))
    else:
        tensors, qc = QUANTIZED_CASES[code]
        dest = _quantized_folder(tiny_base, tmp_path / "base", tensors, qc)
    report = doctor.run(dest, np_adapter, free_bytes=10**12)
    f = one(report, code)
    assert f.severity == F.BLOCKER
    assert "model.layers.0.self_attn.q_proj" in f.what and str(dest) in f.what
    assert f.fix
    # no other weight format is claimed
    assert {c for c in codes(report) if c.startswith("BASE_")} == {code}


def test_unknown_quant_method_is_a_blocker(tiny_base, np_adapter, tmp_path):
    dest = _quantized_folder(tiny_base, tmp_path / "base", {"model.norm.weight": np.ones(64, np.float32)},
                             {"quant_method": "hqq"})
    report = doctor.run(dest, np_adapter, free_bytes=10**12)
    assert one(report, "BASE_QUANTIZED_UNKNOWN").data["format"] == "hqq"


def test_truncated_shard_is_a_blocker(tiny_base, np_adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for p in tiny_base.iterdir():
        shutil.copyfile(p, base / p.name)
    shard = sorted(base.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    report = doctor.run(base, np_adapter, free_bytes=10**12)
    f = one(report, "BASE_INVALID")
    assert shard.name in f.what and "download it again" in f.what


# --------------------------------------------------------------------------- architecture and tools


def test_unsupported_architecture_is_a_blocker(tiny_base, np_adapter, tmp_path):
    base = copy_base(tiny_base, tmp_path / "base")
    edit_json(base / "config.json", architectures=["FalconForCausalLM"], model_type="falcon")
    report = doctor.run(base, np_adapter, free_bytes=10**12)
    f = one(report, "ARCH_UNSUPPORTED")
    # names what it found and every family it supports
    assert "FalconForCausalLM" in f.what
    for supported in ("GptOssForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                      "Qwen3ForCausalLM"):
        assert supported in f.what
    assert report.architecture is None


def test_probe_reads_the_installed_tools():
    tools = checks.probe_tools(["gpt-oss", "no-such-arch-xyz"])
    import llama_cpp
    assert tools.llama_cpp_version == llama_cpp.__version__
    assert tools.llama_arch_names == frozenset({"gpt-oss"})
    transformers = pytest.importorskip("transformers")
    assert tools.transformers_version == transformers.__version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    assert ("gpt_oss" in tools.transformers_model_types) == ("gpt_oss" in CONFIG_MAPPING_NAMES)
    # the source-read table holds every standard model type of the imported one
    standard = {k for k in CONFIG_MAPPING_NAMES if k.replace("-", "_") == k and k.islower()}
    assert len(standard - tools.transformers_model_types) <= len(CONFIG_MAPPING_NAMES) // 50


def test_llama_cpp_without_the_arch_is_a_blocker(tiny_base, np_adapter):
    real = checks.probe_tools(["gpt-oss"])
    older = dataclasses.replace(real, llama_arch_names=frozenset())  # a llama.cpp built before gpt-oss
    report = doctor.run(tiny_base, np_adapter, free_bytes=10**12, tools=older)
    f = one(report, "LLAMACPP_ARCH_UNKNOWN")
    assert real.llama_cpp_version in f.what and "gpt-oss" in f.what and "upgrade" in f.fix
    no_tf = dataclasses.replace(real, transformers_model_types=frozenset({"llama"}))
    report = doctor.run(tiny_base, np_adapter, free_bytes=10**12, tools=no_tf)
    assert one(report, "TRANSFORMERS_ARCH_UNKNOWN").severity == F.INFO
    no_llama = dataclasses.replace(real, llama_cpp_version=None, llama_lib=None)
    assert "LLAMACPP_MISSING" in blockers(doctor.run(tiny_base, np_adapter, free_bytes=10**12, tools=no_llama))


def test_remote_code_is_reported_never_run(tiny_base, np_adapter, tmp_path):
    base = copy_base(tiny_base, tmp_path / "base")
    marker = tmp_path / "ran"
    edit_json(base / "config.json", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (base / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    report = doctor.run(base, np_adapter, free_bytes=10**12)
    f = one(report, "REMOTE_CODE")
    assert "auto_map" in f.what and "configuration_evil.py" in f.what and f.severity == F.WARNING
    assert not marker.exists()


# --------------------------------------------------------------------------- adapter against base


def test_adapter_for_another_model_is_a_blocker(tiny_base, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(synth.gpt_oss_config(**{**synth.TINY, "hidden_size": 32})))
    ad = adapter_from(other, tmp_path / "adapter", tokenizer="none", base_model_name_or_path="openai/gpt-oss-120b")
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "ADAPTER_BASE_MISMATCH")
    assert "adapter_model.safetensors" in f.what and "openai/gpt-oss-120b" in f.fix
    name = one(report, "ADAPTER_BASE_NAME")
    assert name.data["adapter_base"] == "openai/gpt-oss-120b" and name.severity == F.WARNING


def test_adapter_with_another_expert_count_is_a_blocker(tiny_base, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(synth.gpt_oss_config(**{**synth.TINY, "num_local_experts": 8})))
    ad = adapter_from(other, tmp_path / "adapter", tokenizer="none", target_modules=())
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_BASE_MISMATCH")
    assert "experts" in f.what


def test_base_names_that_differ_only_in_format_are_the_same_model(tiny_base, tmp_path):
    base = copy_base(tiny_base, tmp_path / "gpt-oss-20b-BF16")
    ad = adapter_from(base, tmp_path / "adapter", base_model_name_or_path="unsloth/gpt-oss-20b-unsloth-bnb-4bit")
    assert "ADAPTER_BASE_NAME" not in codes(doctor.run(base, ad, free_bytes=10**12))


def test_zero_adapter_is_a_blocker(tiny_base, tmp_path):
    ad = adapter_from(tiny_base, tmp_path / "adapter", init_scale=0.0)  # lora_B all zero, as PEFT initialises it
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_ZERO")
    assert f.severity == F.BLOCKER and f.data["pairs"] == len(f.data["zero_pairs"]) > 0


def test_partly_zero_adapter_is_a_warning(np_adapter, tiny_base, tmp_path):
    ad = tmp_path / "adapter"
    shutil.copytree(np_adapter, ad)
    tensors = load_tensors(ad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = np.zeros_like(tensors[key])
    save_tensors(ad / "adapter_model.safetensors", tensors)
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_PARTLY_ZERO")
    assert f.data["zero_pairs"] == ["base_model.model.model.layers.1.self_attn.v_proj"]


def test_nan_adapter_is_a_blocker(np_adapter, tiny_base, tmp_path):
    ad = tmp_path / "adapter"
    shutil.copytree(np_adapter, ad)
    tensors = load_tensors(ad / "adapter_model.safetensors")
    k1 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    k2 = "base_model.model.model.layers.1.mlp.experts.lora_B.weight"
    tensors[k1][0, :3] = np.nan
    tensors[k2][1, 1] = np.inf
    save_tensors(ad / "adapter_model.safetensors", tensors)
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_NONFINITE")
    assert f.data["tensors"] == {k1: 3, k2: 1}
    assert k1 in f.what


def test_adapter_with_a_lonely_lora_a_is_invalid(np_adapter, tiny_base, tmp_path):
    ad = tmp_path / "adapter"
    shutil.copytree(np_adapter, ad)
    tensors = load_tensors(ad / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    save_tensors(ad / "adapter_model.safetensors", tensors)
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_INVALID")
    assert "k_proj has lora_A but no lora_B" in f.what


def test_unsupported_adapter_feature_is_a_blocker(np_adapter, tiny_base, tmp_path):
    ad = tmp_path / "adapter"
    shutil.copytree(np_adapter, ad)
    edit_json(ad / "adapter_config.json", use_qalora=True)
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_UNSUPPORTED_FEATURE")
    assert "QA-LoRA" in f.what


def test_dora_flag_without_magnitudes_is_named(np_adapter, tiny_base, tmp_path):
    """DoRA is merged; an adapter_config that says use_dora with weights that hold no magnitude
    vectors does not describe its weights: named as such."""
    ad = tmp_path / "adapter"
    shutil.copytree(np_adapter, ad)
    edit_json(ad / "adapter_config.json", use_dora=True)
    f = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_INVALID")
    assert "use_dora=True" in f.what and "magnitude" in f.what


def test_pickle_adapter_is_refused_unread(np_adapter, tiny_base, tmp_path):
    ad = tmp_path / "adapter"
    shutil.copytree(np_adapter, ad)
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    report = doctor.run(tiny_base, ad, free_bytes=10**12)
    f = one(report, "ADAPTER_INVALID")
    assert "adapter_model.bin" in f.what and "pickle" in f.what


def test_rslora_and_patterns_are_summarised(tiny_base, tmp_path):
    ad = adapter_from(tiny_base, tmp_path / "adapter", r=16, lora_alpha=32, use_rslora=True)
    s = one(doctor.run(tiny_base, ad, free_bytes=10**12), "ADAPTER_SUMMARY")
    assert s.data["use_rslora"] is True and s.data["scale"] == pytest.approx(32 / 4.0)
    assert "rsLoRA" in s.what


# --------------------------------------------------------------------------- resources


def test_full_disk_is_a_blocker(tiny_base, np_adapter, tmp_path):
    report = doctor.run(tiny_base, np_adapter, out_dir=tmp_path / "out", free_bytes=1000)
    f = one(report, "DISK_SPACE")
    res = report.resources
    assert f.data == {"free_bytes": 1000, "bytes_needed": res.bytes_needed}
    assert res.bytes_needed == sum(o.bytes for o in res.outputs)
    assert report.exit_code == 2
    low = doctor.run(tiny_base, np_adapter, free_bytes=int(res.bytes_needed * 1.05))
    assert "DISK_SPACE_LOW" in warnings_(low) and "DISK_SPACE" not in codes(low)
    ok = doctor.run(tiny_base, np_adapter, free_bytes=res.bytes_needed * 2)
    assert not ({"DISK_SPACE", "DISK_SPACE_LOW"} & codes(ok))


def test_resources_say_which_merge_route_runs(tiny_base, np_adapter, monkeypatch):
    from lora2gguf import kernel
    f = one(doctor.run(tiny_base, np_adapter, free_bytes=10**12), "RESOURCES")
    assert "merge: the compiled kernel" in f.what
    monkeypatch.setattr(kernel, "_lib", None)
    monkeypatch.setattr(kernel, "_why", "the compiled kernel is not built")
    f = one(doctor.run(tiny_base, np_adapter, free_bytes=10**12), "RESOURCES")
    assert "merge: in numpy" in f.what and "the compiled kernel is not built" in f.what and "reinstall" in f.what


def test_free_space_is_measured_on_the_nearest_existing_parent(tiny_base, np_adapter, tmp_path):
    out = tmp_path / "not" / "yet" / "there"
    report = doctor.run(tiny_base, np_adapter, out_dir=out)
    assert report.resources.free_where == str(tmp_path)
    assert report.resources.free_bytes == shutil.disk_usage(tmp_path).free or \
        abs(report.resources.free_bytes - shutil.disk_usage(tmp_path).free) < 64 << 20


def test_size_estimates_follow_the_shapes(tiny_base, np_adapter):
    import gguf
    report = doctor.run(tiny_base, np_adapter, outputs=("BF16", "Q8_0", "Q4_K_M"), free_bytes=10**12)
    est = {o.name: o for o in report.resources.outputs}
    shapes = report.inspection.base.logical_shapes
    cfg = synth.read_config(tiny_base)
    # kept F32: the routers, and (not being .weight tensors) the 2-D expert biases
    n_router = cfg["num_hidden_layers"] * cfg["num_local_experts"] * cfg["hidden_size"]
    n_router += sum(int(np.prod(s)) for n, s in shapes.items() if n.endswith("_bias") and len(s) == 2)
    one_d = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 1)
    two_d = sum(int(np.prod(s)) for s in shapes.values() if len(s) > 1)
    meta = est["BF16"].bytes - (2 * (two_d - n_router) + 4 * (one_d + n_router))
    assert 10e6 < meta < 16e6  # the o200k vocabulary and merges in the GGUF header
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    assert est["Q8_0"].bytes == (two_d - n_router) // block * size + 4 * (one_d + n_router) + meta
    # widths of 64 do not fit Q4_K's 256-blocks: llama.cpp falls back to Q5_0 (and Q6_K's to Q8_0)
    assert est["Q4_K_M"].ggml_type == "Q4_K"
    assert est["Q8_0"].bytes > est["Q4_K_M"].bytes > (two_d - n_router) // 32 * 22 + meta
    assert est["Q8_0"].bytes_read == est["BF16"].bytes
    # tiny tensors fit one slab: the working set is 4 float32 copies of the largest per worker
    # thread, the finished slabs waiting to be written (here: at most the whole model), LoRA factors
    from lora2gguf.stream import LOOKAHEAD_BYTES, default_threads
    largest = max(int(np.prod(s)) for s in shapes.values())
    workers = 16 * largest * default_threads()
    waiting = min(LOOKAHEAD_BYTES, 4 * sum(int(np.prod(s)) for s in shapes.values()))
    assert workers <= report.resources.peak_memory_bytes <= workers + waiting + 4 * 2**20


def test_quantized_only_outputs_count_the_bf16_intermediate(tiny_base, np_adapter):
    report = doctor.run(tiny_base, np_adapter, outputs=("Q8_0",), free_bytes=10**12)
    names = [(o.name, o.intermediate) for o in report.resources.outputs]
    assert names == [("BF16", True), ("Q8_0", False)]


def test_unknown_output_type_is_a_blocker(tiny_base, np_adapter):
    report = doctor.run(tiny_base, np_adapter, outputs=("BF16", "Q9_X"), free_bytes=10**12)
    f = one(report, "OUTPUT_TYPE_UNKNOWN")
    assert f.data == {"type": "Q9_X"} and "Q4_K_M" in f.fix


# --------------------------------------------------------------------------- report shape


def test_json_schema_is_stable(tiny_base, tmp_path):
    ad = variant_adapter(tiny_base, tmp_path, lambda d: o200k.write_tokenizer(d, extra_tokens=["<|xyrus|>"]))
    report = doctor.run(tiny_base, ad, free_bytes=1000)
    data = json.loads(report.to_json({"DISK_SPACE"}))
    assert set(data) == {"schema", "base_dir", "adapter_dir", "architecture", "exit_code", "counts", "tokenizer",
                         "findings", "resources", "bytes_read", "seconds"}
    assert data["schema"] == doctor.SCHEMA and data["exit_code"] == 2
    assert set(data["tokenizer"]) == {"dir", "source", "reason"}
    assert data["counts"] == {s: sum(f["severity"] == s for f in data["findings"]) for s in F.SEVERITIES}
    for f in data["findings"]:
        assert set(f) == {"code", "severity", "title", "what", "why", "fix", "data", "accepted"}
        assert F.CODES[f["code"]] == (f["severity"], f["title"])
        assert f["accepted"] == (f["code"] == "DISK_SPACE")
    sev = [F.SEVERITIES.index(f["severity"]) for f in data["findings"]]
    assert sev == sorted(sev)
    for f in data["findings"]:  # every blocker and warning says why and how to fix it
        if f["severity"] != F.INFO:
            assert f["why"] and f["fix"], f["code"]


def test_codes_are_unique_and_severities_known():
    assert all(sev in F.SEVERITIES and title for sev, title in F.CODES.values())
    assert all(code == code.upper() and " " not in code for code in F.CODES)
    # a renamed code is gone from CODES (never reused) and its new code is one
    assert not set(F.RENAMED) & set(F.CODES) and set(F.RENAMED.values()) <= set(F.CODES)
    assert F.accepted_codes([" eos_not_return", "DISK_SPACE"]) == {"EOS_NOT_RETURN", "EOS_NOT_ANSWER_END", "DISK_SPACE"}


def test_llama_arch_answers_are_cached_per_library_file(tmp_path, monkeypatch):
    """Which architectures llama.cpp knows is asked of llama.cpp once per library file (path, size,
    mtime) and kept in the cache folder; an entry for another build of the library is not used."""
    import json

    monkeypatch.setenv("LORA2GGUF_CACHE", str(tmp_path / "cache"))
    lib = checks.find_libllama()
    assert checks.llama_arch_names(lib, ["gpt-oss", "no-such-arch-xyz"]) == frozenset({"gpt-oss"})
    cache = tmp_path / "cache" / checks.ARCH_CACHE
    (key, answers), = json.loads(cache.read_text()).items()
    st = lib.stat()
    assert key == f"{lib}|{st.st_size}|{st.st_mtime_ns}" and answers == {"gpt-oss": True, "no-such-arch-xyz": False}
    # the kept answers are the ones given (an edited entry shows it)
    cache.write_text(json.dumps({key: {"gpt-oss": False, "no-such-arch-xyz": True}}))
    assert checks.llama_arch_names(lib, ["gpt-oss", "no-such-arch-xyz"]) == frozenset({"no-such-arch-xyz"})
    # an entry of another build of the library (another size) is not used, and is replaced
    other = f"{lib}|{st.st_size + 1}|{st.st_mtime_ns}"
    cache.write_text(json.dumps({other: {"gpt-oss": False}}))
    assert checks.llama_arch_names(lib, ["gpt-oss"]) == frozenset({"gpt-oss"})
    assert list(json.loads(cache.read_text())) == [key]
    # a cache that cannot be read is asked around
    cache.write_text("{not json")
    assert checks.llama_arch_names(lib, ["gpt-oss"]) == frozenset({"gpt-oss"})
