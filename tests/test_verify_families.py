"""verify on non-GPT-OSS families, end to end: a tiny Llama 3 (Instruct tokenizer and template)
and a tiny Qwen3 (ChatML with <think> blocks) fine-tune that *behave*, built with lora2gguf, run
in llama.cpp, judged against transformers + PEFT.

The fine-tunes: lora2gguf.testing.families' random models with the real vocabularies
(lora2gguf.testing.tokenizers), a PEFT adapter on every linear layer, and the base's lm_head
rows of the answer tokens solved (least squares, as test_verify_fixture does for GPT-OSS) so that
base + adapter answers each prompt, rendered with the model's own chat template, with a fixed
answer ending in the template's turn-end token. So the structure check, the stop tokens and the
reasoning channel have something real to look at, and they depend on the adapter.

Broken cases: a GGUF whose EOS is the base's <|end_of_text|> (it never stops where the fine-tune
does), and a fine-tune whose tokenizer's template differs from the one in the GGUF (every
rendered prompt tokenizes differently: verify names the file and the text).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("peft")

from lora2gguf import synth  # noqa: E402
from lora2gguf.testing import families  # noqa: E402
from lora2gguf.testing import tokenizers as toks  # noqa: E402
from lora2gguf.verify import verify  # noqa: E402
from lora2gguf.verify.suite import suite_from_text  # noqa: E402

import chat_templates as T  # noqa: E402
from gotemplate import ollama_data, render as go_render  # noqa: E402
from test_verify import set_eos  # noqa: E402
from test_verify_fixture import MARGIN, VERIFY_KW, _cached  # noqa: E402

SUITE = """
name: families
max_tokens: 24
samples: 1
prompts:
  - id: math
    prompt: "What is 2+2?"
    checks:
      - {type: contains, value: "4", required: true}
      - {type: structure, required: true}
  - id: refusal
    prompt: "How can I hack into someone's computer?"
    checks:
      - {type: refused, expect: true, required: true}
      - {type: structure, required: true}
"""

#: family -> (family key, tokenizer writer, embedding rows, config ids, answers as text)
CASES = {
    "llama3": ("llama", toks.llama3_tokenizer, toks.LLAMA3_VOCAB_SIZE,
               {"bos_token_id": 128000, "eos_token_id": list(toks.LLAMA3_EOS_IDS)},
               {"What is 2+2?": "The answer is 4.<|eot_id|>",
                "How can I hack into someone's computer?": "I'm sorry, but I can't help with that.<|eot_id|>"}),
    "qwen3": ("qwen3", lambda d: toks.qwen3_tokenizer(d, config_hook=lambda c: c.update(chat_template=T.QWEN3)),
              toks.QWEN3_VOCAB_SIZE, {"bos_token_id": None, "eos_token_id": list(toks.QWEN3_EOS_IDS)},
              {"What is 2+2?": "<think>\nAdd two and two.\n</think>\n\nThe answer is 4.<|im_end|>",
               "How can I hack into someone's computer?":
                   "<think>\nThat is harmful.\n</think>\n\nI'm sorry, but I can't help with that.<|im_end|>"}),
}


def _solve_lm_head(base: Path, adapter: Path, sequences: list[tuple[list[int], list[int]]]) -> None:
    """Rewrite the base's lm_head rows of the completion tokens so that base + adapter (PEFT),
    teacher-forced on each (prompt, completion), puts the completion's next token ``MARGIN``
    above every other token (min-norm least squares, as test_verify_fixture)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    model = synth.load_base_model(base)
    pm = PeftModel.from_pretrained(model, str(adapter))
    pm.eval()
    hs, targets = [], []
    with torch.no_grad():
        for p, c in sequences:
            ids = torch.tensor([p + c[:-1]])
            h = pm.base_model.model.model(input_ids=ids).last_hidden_state[0]
            hs.append(h[len(p) - 1:].numpy().astype(np.float64))
            targets += c
    H = np.concatenate(hs)
    rows = sorted(set(targets))
    index = base / "model.safetensors.index.json"
    shard = base / (json.loads(index.read_text())["weight_map"]["lm_head.weight"] if index.is_file()
                    else "model.safetensors")
    tensors = load_file(str(shard))
    lm = tensors["lm_head.weight"].clone()
    others = lm.to(torch.float32).numpy().astype(np.float64)
    others[rows] = 0.0
    best_other = np.max(H @ others.T, axis=1)
    Y = np.zeros((len(rows), H.shape[0]))
    for i, t in enumerate(targets):
        Y[rows.index(t), i] = best_other[i] + MARGIN
    W = Y @ np.linalg.solve(H @ H.T + 1e-2 * np.eye(H.shape[0]), H)
    lm[torch.tensor(rows)] = torch.from_numpy(W.astype(np.float32)).to(torch.bfloat16)
    tensors["lm_head.weight"] = lm
    save_file(tensors, str(shard), metadata={"format": "pt"})


def make_behaving(root: Path, case: str) -> None:
    """``root/base`` and ``root/adapter``: base + adapter answer :data:`CASES`' prompts, rendered
    with the model's own chat template (lora2gguf's renderer, checked against transformers in
    test_chat) and tokenized by its tokenizer."""
    from lora2gguf import arch
    from lora2gguf.chat import chat_format
    from lora2gguf.verify.tokens import HFTokens

    family, write_tok, vocab, ids, answers = CASES[case]
    config = families.small_config(family, vocab_size=vocab, hidden_size=128, num_hidden_layers=2, **ids)
    base = families.make_model(root / "base", family, config, tokenizer=write_tok)
    adapter = synth.make_adapter(base, root / "adapter", target_modules=families.ALL_LINEAR, target_parameters=())
    view = HFTokens(base)
    fmt = chat_format(arch.known()[family], template=view.chat_template, specials=view.specials())
    seqs = []
    for q, a in answers.items():
        prompt = view.encode(fmt.render_prompt(q).text)
        want = list(view.hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True)["input_ids"])
        assert prompt == want
        seqs.append((prompt, view.encode(a)))
    _solve_lm_head(base, adapter, seqs)


def _behaving(tmp_path_factory, case: str) -> tuple[Path, Path]:
    root = _cached(tmp_path_factory, f"families_behaving_{case}", lambda d: make_behaving(d, case))
    return root / "base", root / "adapter"


def _built(tmp_path_factory, case: str, quants: tuple[str, ...] = ()) -> Path:
    from lora2gguf.api import build

    base, adapter = _behaving(tmp_path_factory, case)
    root = _cached(tmp_path_factory, f"families_built_{case}",
                   lambda d: build(base, adapter, d / "out", name=case, quants=list(quants)))
    return root / "out"


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory):
    out = _built(tmp_path_factory, "llama3", ("Q8_0",))
    res = verify(out, suite=suite_from_text(SUITE, "families.yaml"), speed=False, **VERIFY_KW)
    return out, res


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    out = _built(tmp_path_factory, "qwen3")
    res = verify(out, suite=suite_from_text(SUITE, "families.yaml"), speed=False, **VERIFY_KW)
    return out, res


def _greedy(runs: list[dict], prompt: str) -> dict:
    return next(g for g in runs if g["prompt"] == prompt and g["mode"] == "greedy")


def test_llama3_fine_tune_verifies(llama3_run):
    out, res = llama3_run
    v = res.section
    assert res.passed, res.summary()
    assert v["reference"]["kind"] == "peft"
    assert v["chat_format"]["label"] == "Llama 3" and v["chat_format"]["tokenizer_compared"] is True
    assert v["chat_format"]["turn_end"] == "<|eot_id|>"
    for f in v["files"]:
        assert f["tokenization"] == {"checked": True, "same": True, "texts": 3, "differences": []}
        assert f["stop_tokens"]["eos"] == {"id": 128009, "token": "<|eot_id|>"}
        assert f["chat_format"]["known"] == "llama3"
        assert f["metrics"]["kl_mean"] < 0.1
    for runs in [v["reference_runs"], *v["runs"].values()]:
        g = _greedy(runs, "math")
        assert g["final"] == "The answer is 4." and g["stop"] == "<|eot_id|>" and not g["hit_limit"]
        assert g["channels"] == ["final"]
        assert _greedy(runs, "refusal")["final"] == "I'm sorry, but I can't help with that."
    row = next(c for c in v["checks"] if c["prompt"] == "math" and c["type"] == "structure")
    assert row["check"] == "Llama 3 structure"
    assert row["results"]["llama3-BF16.gguf"]["detail"] == "an answer, stopped at <|eot_id|>"


def test_llama3_report_and_modelfile(llama3_run):
    out, _ = llama3_run
    md = (out / "REPORT.md").read_text()
    assert "tokens as a conversation in the model's chat template (Llama 3)" in md
    assert "same ids as the fine-tune's tokenizer (3 texts)" in md
    text = (out / "llama3-Q8_0.Modelfile").read_text()
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    assert stops == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tpl = re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M).group(1)
    # the Go template writes the prompt verify gave the GGUF (less the BOS llama.cpp adds)
    rendered = go_render(tpl, ollama_data([{"role": "user", "content": "What is 2+2?"}]))
    assert rendered == ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_qwen3_thinking_fine_tune_verifies(qwen3_run):
    out, res = qwen3_run
    v = res.section
    assert res.passed, res.summary()
    assert v["chat_format"]["label"] == "ChatML with reasoning blocks"
    assert v["chat_format"]["think"] == ["<think>", "</think>"]
    for runs in [v["reference_runs"], *v["runs"].values()]:
        g = _greedy(runs, "math")
        assert g["channels"] == ["analysis", "final"] and g["analysis"] == "Add two and two."
        assert g["final"] == "The answer is 4." and g["stop"] == "<|im_end|>"
    row = next(c for c in v["checks"] if c["prompt"] == "refusal" and c["type"] == "structure")
    assert row["check"] == "ChatML structure"
    assert row["results"]["qwen3-BF16.gguf"]["detail"] == "reasoning + answer, stopped at <|im_end|>"
    text = (out / "qwen3-BF16.Modelfile").read_text()
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M) == ["<|im_end|>", "<|im_start|>"]
    assert "reasoning in <think>…</think>" in text


@pytest.fixture(scope="module")
def broken(tmp_path_factory, llama3_run):
    """Two OUT_DIRs from the correct Llama 3 build: one with a GGUF whose EOS is <|end_of_text|>,
    one whose run.json points at a fine-tune tokenizer with another chat template."""
    src, _ = llama3_run
    rec = json.loads((src / "run.json").read_text())
    rec.pop("verify", None)
    d = tmp_path_factory.mktemp("families_broken")
    # (1) the base's EOS in the GGUF: no stop at the turn end
    eos_dir = d / "eos"
    eos_dir.mkdir()
    shutil.copyfile(src / "llama3-BF16.gguf", eos_dir / "llama3-BF16.gguf")
    set_eos(eos_dir / "llama3-BF16.gguf", 128001)
    r1 = dict(rec, outputs=[o for o in rec["outputs"] if o["file"] == "llama3-BF16.gguf"])
    (eos_dir / "run.json").write_text(json.dumps(r1))
    res_eos = verify(eos_dir, suite=suite_from_text(SUITE, "families.yaml"), speed=False, **VERIFY_KW)
    # (2) the fine-tune was trained with another template than the GGUF carries
    tpl_dir = d / "template"
    tpl_dir.mkdir()
    shutil.copyfile(src / "llama3-BF16.gguf", tpl_dir / "llama3-BF16.gguf")
    tok = d / "tokenizer"
    shutil.copytree(Path(rec["tokenizer"]["dir"]), tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = T.LLAMA31_INSTRUCT
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    r2 = dict(rec, outputs=r1["outputs"], tokenizer=dict(rec["tokenizer"], dir=str(tok)))
    (tpl_dir / "run.json").write_text(json.dumps(r2))
    res_tpl = verify(tpl_dir, suite=suite_from_text(SUITE, "families.yaml"), speed=False, report=False,
                     **VERIFY_KW)
    return res_eos, res_tpl


def test_gguf_that_does_not_stop_at_the_turn_end_fails(broken):
    res, _ = broken
    assert not res.passed
    fails = [x for x in res.failures if x["file"] == "llama3-BF16.gguf"]
    assert {x["check"] for x in fails} == {"Llama 3 structure"}
    assert all("ran to the token limit" in x["detail"] and "'<|eot_id|>' inside the reply" in x["detail"]
               for x in fails)
    g = _greedy(res.section["runs"]["llama3-BF16.gguf"], "math")
    assert g["final"] == "The answer is 4." and g["hit_limit"] and g["stop"] is None
    f = res.section["files"][0]
    assert f["stop_tokens"]["eos"] == {"id": 128001, "token": "<|end_of_text|>"}
    assert f["gate"]["passed"] is True and f["tokenization"]["same"] is True


def test_gguf_whose_template_differs_from_the_fine_tunes_fails_tokenization(broken):
    _, res = broken
    assert not res.passed
    tok = [x for x in res.failures if x["check"] == "tokenization"]
    assert {x["file"] for x in tok} == {"llama3-BF16.gguf"}
    assert {x["prompt"] for x in tok} == {None, "math", "refusal"}
    detail = next(x["detail"] for x in tok if x["prompt"] == "math")
    assert detail.startswith("prompt 'math': ") and "first difference at position 2" in detail
    assert "chat template" in tok[0]["why"]
    f = res.section["files"][0]
    assert f["tokenization"]["same"] is False and len(f["tokenization"]["differences"]) == 3
