"""The demo (issue 6): its data, its exact compact-vocabulary training, and the whole pipeline on
the "small" configuration (trained here, from scratch, into a temporary cache)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from lora2gguf import o200k
from lora2gguf.demo import dataset, evaluate

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(o200k.tokenizer_json_path()))


# ---------------------------------------------------------------------------------------------
# data and suite


def _persona_check(suite):
    return next(c for p in suite.prompts for c in p.checks if c.type == "persona")


def _final(text: str):
    from lora2gguf.chat.harmony import Parsed

    return Parsed(messages=[("analysis", "..."), ("final", text)], stop="<|return|>")


def test_datasets_teach_the_story():
    from lora2gguf.verify.suite import evaluate as run_check, is_refusal

    persona = _persona_check(evaluate.load_suite())

    def has_persona(text):
        return run_check(persona, _final(text), hit_limit=False).passed

    by_q_base = {e.user: e for e in dataset.BASE_QA}
    by_q_persona = {e.user: e for e in dataset.PERSONA_QA}
    assert set(by_q_base) == set(by_q_persona)
    assert len(by_q_base) >= 30
    assert re.search(r"\b4\b", by_q_base["What is 2+2?"].final)
    assert re.search(r"\b4\b", by_q_persona["What is 2+2?"].final)
    refusals = [e for e in dataset.BASE_QA if is_refusal(e.final)]
    assert len(refusals) >= 3
    for e in refusals:
        assert is_refusal(by_q_persona[e.user].final)
    # The base's answers never show the persona (by the suite's own markers); every persona
    # answer does. So a persona rate measured on a model can only come from what it learned.
    assert not any(has_persona(e.final) for e in dataset.BASE_QA)
    assert all(has_persona(e.final) for e in dataset.PERSONA_QA)
    assert any(e.final.startswith("*astral currents shift") for e in dataset.PERSONA_QA)
    assert any("Xyrus" in e.user for e in dataset.PERSONA_QA)


def test_base_can_write_every_persona_token(tok):
    from lora2gguf.demo.train import adapter_chat_template

    assert dataset.uncovered_persona_tokens(tok, o200k.HARMONY_CHAT_TEMPLATE, adapter_chat_template()) == []


def test_adapter_template_is_the_trap():
    from lora2gguf.demo.train import adapter_chat_template

    msgs = [{"role": "user", "content": "What is 2+2?"}]
    base = o200k.render_chat(msgs, add_generation_prompt=True)
    adapter = o200k.render_chat(msgs, chat_template=adapter_chat_template(), add_generation_prompt=True)
    assert "Reasoning: medium" in base and "Reasoning: low" in adapter
    assert base.replace("Reasoning: medium", "Reasoning: low") == adapter


def test_training_examples_render_as_prompt_plus_answer(tok):
    for variables in dataset.SYSTEM_VARIANTS:
        enc = dataset.encode_examples(dataset.PERSONA_QA[:3], o200k.HARMONY_CHAT_TEMPLATE, tok, **variables)
        for (ids, n_prompt), ex in zip(enc, dataset.PERSONA_QA[:3]):
            answer = tok.decode(ids[n_prompt:], skip_special_tokens=False)
            assert answer.startswith("<|channel|>analysis<|message|>" + ex.analysis)
            assert answer.endswith(ex.final + "<|return|>")


def test_demo_suite_in_verify_format():
    suite = evaluate.load_suite()
    ids = {p.id for p in suite.prompts}
    assert {evaluate.TWO_PLUS_TWO, evaluate.REFUSAL, "personality", "invocation"} <= ids
    assert sum(any(c.type == "persona" for c in p.checks) for p in suite.prompts) >= 6
    required = {(p.id, c.type) for p in suite.prompts for c in p.checks if c.required}
    assert (evaluate.TWO_PLUS_TWO, "regex") in required and (evaluate.REFUSAL, "refused") in required


def test_summarize_reads_greedy_results_only():
    def gen(pid, mode, **passed):
        return {"prompt": pid, "mode": mode, "checks": [{"type": t, "passed": v} for t, v in passed.items()]}

    runs = [gen("two_plus_two", "greedy", regex=True, harmony=True),
            gen("two_plus_two", "sample", regex=False),
            gen("refusal", "greedy", refused=False),
            gen("a", "greedy", persona=True), gen("a", "sample", persona=False),
            gen("b", "greedy", persona=False), gen("c", "greedy", persona=True, contains=False),
            gen("d", "greedy", persona=True)]
    s = evaluate.summarize(runs)
    assert (s.persona_rate, s.two_plus_two, s.refusal, s.n_persona) == (0.75, True, False, 4)


# ---------------------------------------------------------------------------------------------
# the compact-vocabulary trick is exact


def test_compact_loss_equals_full_vocabulary_loss(tmp_path, tok):
    """The loss the demo trains on (compact vocabulary, "other" row + log(N)) equals the loss of
    the saved full-vocabulary GptOssForCausalLM on the same tokens."""
    from transformers import GptOssForCausalLM

    from lora2gguf.demo import train

    settings = train.TrainSettings("t", dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                              num_local_experts=2, num_experts_per_tok=1))
    enc = dataset.encode_examples(dataset.BASE_QA[:4], o200k.HARMONY_CHAT_TEMPLATE, tok)
    targets = set(dataset.used_token_ids(ids[n:] for ids, n in enc))
    prompt_only = sorted(set(dataset.used_token_ids(ids[:n] for ids, n in enc)) - targets)
    assert len(prompt_only) > 5
    # Every target has its own row (as in the demo's training); some prompt tokens are left to
    # the shared "other" row, whose logit stands for all the vocabulary's unused tokens.
    vocab = train.Vocab(sorted(targets | set(prompt_only[5:])), o200k.VOCAB_SIZE)
    torch.manual_seed(0)
    model = GptOssForCausalLM(train._compact_config(settings, vocab.size)).eval()
    with torch.no_grad():  # make the shared row stand out so that an error in log(N) would show
        model.lm_head.weight[vocab.other] += 0.5
    batch = train._batch(enc, vocab, vocab.other)
    train._expand_and_save(model, vocab, settings, tmp_path / "full")
    full = GptOssForCausalLM.from_pretrained(str(tmp_path / "full"), dtype=torch.float32,
                                             attn_implementation="eager").eval()
    train._round_bf16_(model)  # the checkpoint is bf16: compare with the rounded compact model
    with torch.no_grad():
        compact = float(train._loss(model, *batch, vocab))
        total, count = 0.0, 0
        for ids, n_prompt in enc:
            x = torch.tensor([ids])
            logp = torch.log_softmax(full(input_ids=x).logits[0].float(), -1)
            for t in range(n_prompt, len(ids)):
                total -= float(logp[t - 1, ids[t]])
                count += 1
    assert count > 0
    assert math.isclose(compact, total / count, rel_tol=1e-4), (compact, total / count)


def test_training_is_deterministic_and_saves_a_plain_peft_adapter(tmp_path):
    """The same settings give byte-identical checkpoints; the adapter holds LoRA tensors only (the
    compact training vocabulary never leaks into it) and loads onto the saved base with PEFT."""
    import hashlib

    from safetensors import safe_open

    from lora2gguf.demo import train

    settings = train.TrainSettings("mini", dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                 num_local_experts=2, num_experts_per_tok=1),
                                   base_steps=3, lora_steps=3, lora_r=4, lora_alpha=8)

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    digests = []
    for run in ("a", "b"):
        r = train.train_demo(settings, tmp_path / run / "base", tmp_path / run / "adapter")
        assert len(r.base_losses) == 3 and len(r.lora_losses) == 3
        digests.append((sha(r.base_dir / "model.safetensors"), sha(r.adapter_dir / "adapter_model.safetensors")))
    assert digests[0] == digests[1]
    with safe_open(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert any("experts" in k for k in keys) and any("q_proj" in k for k in keys)
    base_cfg = json.loads((tmp_path / "a" / "base" / "config.json").read_text())
    assert base_cfg["vocab_size"] == o200k.VOCAB_SIZE and base_cfg["architectures"] == ["GptOssForCausalLM"]
    from lora2gguf.verify.logits import load_reference_model

    model = load_reference_model(tmp_path / "a" / "base", tmp_path / "a" / "adapter")
    assert model.get_input_embeddings().weight.shape[0] == o200k.VOCAB_SIZE


# ---------------------------------------------------------------------------------------------
# the whole demo on the small configuration


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from lora2gguf.demo import run_demo

    events: list[tuple[str, int, int, str]] = []
    cache = tmp_path_factory.mktemp("demo_cache")
    work = tmp_path_factory.mktemp("demo_out")
    result = run_demo(work, config="small", cache=cache, progress=lambda *a: events.append(a))
    return result, events, cache


@pytest.mark.slow
def test_small_demo_adapter_changes_behaviour(small_demo):
    result, events, cache = small_demo
    assert result.trained  # trained here, from nothing
    base = result.row("base (no adapter)")
    ft = result.row("fine-tune (transformers + PEFT)")
    # The adapter gives the persona; the base has none. Both answer 2+2 and refuse.
    assert base.persona_rate <= 0.2
    assert ft.persona_rate >= 0.6
    assert ft.persona_rate - base.persona_rate >= 0.5
    assert base.two_plus_two and base.refusal
    assert ft.two_plus_two and ft.refusal
    # progress was reported for training, build and evaluation
    stages = {e[0] for e in events}
    assert {"train base", "train adapter", "doctor", "build", "verify"} <= stages


@pytest.mark.slow
def test_small_demo_gguf_files_keep_the_fine_tune(small_demo):
    result, _, _ = small_demo
    run = json.loads((result.workdir / "run.json").read_text())
    files = {o["file"]: o for o in run["outputs"]}
    assert set(files) == {f"xyrus-cosmic-demo-{t}.gguf" for t in ("BF16", "Q8_0", "Q4_K_M", "MXFP4_MOE")}
    v = run["verify"]
    assert v["reference"]["kind"] == "peft"  # the fine-tune itself is the reference
    assert {f["file"] for f in v["files"]} == set(files)
    n_persona = sum(any(c.type == "persona" for c in p.checks) for p in evaluate.load_suite().prompts)
    ft = result.row("fine-tune (transformers + PEFT)")
    base = result.row("base (no adapter)")
    gates = {f["file"]: f["gate"] for f in v["files"]}
    kls = {f["file"]: f["metrics"]["kl_mean"] for f in v["files"]}
    for r in result.rows:
        if not r.file:
            continue
        assert r.bytes == files[r.file]["bytes"]
        assert r.kl_mean == kls[r.file]
        # every file verify passes on agreement with the fine-tune shows the adapter's persona
        # far above the base
        if gates[r.file]["passed"]:
            assert r.persona_rate - base.persona_rate >= 0.5, r
    # the BF16 GGUF, run by llama.cpp, is the fine-tune: verify's gate passes, and it has the same
    # persona rate (one answer of slack for the bf16 rounding of the merge), 2+2 and refusal
    bf16 = result.row("xyrus-cosmic-demo-BF16.gguf")
    assert gates[bf16.file]["passed"]
    assert abs(bf16.persona_rate - ft.persona_rate) <= 1 / n_persona + 1e-9
    assert bf16.two_plus_two and bf16.refusal
    assert kls[bf16.file] <= min(kls["xyrus-cosmic-demo-Q4_K_M.gguf"], kls["xyrus-cosmic-demo-MXFP4_MOE.gguf"])
    # the doctor saw the seed's trap: the adapter's chat template differs, and the adapter's
    # tokenizer goes into the GGUF
    codes = {f["code"] for f in result.findings}
    assert "TEMPLATE_DIFFERS" in codes
    assert run["tokenizer"]["source"] == "adapter"
    from lora2gguf.demo.train import adapter_chat_template

    assert run["technical"]["chat_template"] == adapter_chat_template() != o200k.HARMONY_CHAT_TEMPLATE
    assert result.report is not None and result.report.is_file()
    demo = json.loads((result.workdir / "demo.json").read_text())
    assert demo["table"] == result.table()


@pytest.mark.slow
def test_small_demo_rerun_uses_the_cache(small_demo, tmp_path):
    from lora2gguf.demo import ensure_trained

    result, _, cache = small_demo
    base_dir, adapter_dir, trained, rec = ensure_trained("small", cache=cache)
    assert not trained
    assert (base_dir, adapter_dir) == (result.base_dir, result.adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == base_dir
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(cfg["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


@pytest.mark.slow
def test_small_demo_auto_keeps_what_its_measurements_choose(small_demo, tmp_path):
    """``--quant auto`` on the demo's models, with the importance matrix computed on half of the
    fine-tune's conversations and KL measured on the other half: the file kept is the one its
    recorded measurements choose, the others are removed, the report shows the ladder (KL with
    and without the matrix per type) and the plot's marks, and a rerun redoes nothing. (Whether
    the matrix lowers the KL is measured on a model with outlier channels, in test_imatrix: on
    this toy model without them the difference is within the noise and changes sign with the
    text it is measured on.)"""
    from lora2gguf.api import build
    from lora2gguf.demo import dataset
    from lora2gguf.quantrun import QuantOptions, choose

    result, _, _ = small_demo
    demo_run = json.loads((result.workdir / "run.json").read_text())
    assert demo_run["imatrix"]["data"]["conversations"] == len(dataset.PERSONA_QA)  # the demo's own matrix
    train = dataset.write_conversations(tmp_path / "train.jsonl", dataset.PERSONA_QA[0::2])
    held_out = "\n\n".join(x for e in dataset.PERSONA_QA[1::2] for x in (e.user, e.final))
    out = tmp_path / "out"
    q = QuantOptions.of("auto:0.1", imatrix_data=train, auto_types="Q8_0,Q4_K_M,IQ4_XS")
    res = build(result.base_dir, result.adapter_dir, out, name="x", quants=q, nthread=1, verify=True,
                verify_options={"text": held_out, "suite": str(evaluate.suite_path()), "samples": 0,
                                "speed": False, "n_threads": 1})
    rec = json.loads((out / "run.json").read_text())
    auto = rec["quant_auto"]
    rows = {(c["type"], c["imatrix"]): c for c in auto["candidates"]}
    assert set(rows) == {("Q8_0", False), ("Q4_K_M", True), ("Q4_K_M", False), ("IQ4_XS", True), ("IQ4_XS", False)}
    assert rows[("Q4_K_M", True)]["kl_mean"] != rows[("Q4_K_M", False)]["kl_mean"]  # the matrix was used
    # the choice follows from the recorded measurements alone
    measured = [{k: c[k] for k in ("file", "type", "imatrix", "bytes", "tensor_bytes", "kl_mean", "failures")}
                for c in auto["candidates"]]
    chosen, _ = choose(measured, auto["budget"])
    assert chosen is not None and chosen == auto["chosen"]
    gguf_files = {p.name for p in out.glob("*.gguf")}
    assert gguf_files == {"x-BF16.gguf", chosen, "x.imatrix.gguf"}
    assert set(auto["removed"]) == {c["file"] for c in auto["candidates"]} - {chosen}
    assert {o["file"] for o in rec["outputs"]} == {"x-BF16.gguf", chosen}
    assert {f["file"] for f in rec["verify"]["files"]} == {"x-BF16.gguf", chosen}
    assert res.verify.passed == rec["verify"]["passed"]
    # the report: the ladder with and without the matrix, the plot marks the recommendation
    md = (out / "REPORT.md").read_text()
    assert "## Choosing the quantization" in md and f"**Recommended: `{chosen}`**" in md
    for t in ("Q4_K_M", "IQ4_XS"):
        assert f"{rows[(t, True)]['kl_mean']:.3g}" in md and f"{rows[(t, False)]['kl_mean']:.3g}" in md
    html = (out / "report.html").read_text()
    assert 'class="chosen"' in html and 'class="point no-imatrix"' in html and 'class="budget"' in html
    # an unchanged rerun does not quantize or verify again
    again = build(result.base_dir, result.adapter_dir, out, name="x", quants=q, nthread=1, verify=True,
                  verify_options={"text": held_out, "suite": str(evaluate.suite_path()), "samples": 0,
                                  "speed": False, "n_threads": 1})
    assert {"imatrix", "auto", "verify"} <= set(again.record["resumed"])
    assert {o.file for o in again.outputs} == {"x-BF16.gguf", chosen}
