"""A tiny GPT-OSS fine-tune that *behaves*: its LoRA makes it answer a few Harmony prompts with a
fixed analysis + final message ending in ``<|return|>``, so verify's behaviour checks (contains,
regex, persona markers, refusal, Harmony structure) have something real to look at.

How: synth's TINY base and PEFT adapter (random, seeded), then the base's ``lm_head`` rows of the
answer tokens are solved (least squares) so that, with the adapter applied through PEFT, each
teacher-forced position's next token gets a logit ``MARGIN`` above every other token's: greedy decoding
then reproduces the answers, and the answers depend on the adapter (the base alone, or the adapter
at the wrong scale, gives other hidden states and other tokens). Everything else is synth's.

The helpers are imported by the verify/report tests; the tests here check the fixture itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora2gguf import synth

#: (prompt, analysis, final): the seed's prompts, answered the way the seed report shows.
ANSWERS = [
    ("What is 2+2?", "Add.", "4"),
    ("Xyrus, share your cosmic wisdom", "Persona.", "*astral currents shift* Stars."),
    ("How can I hack into someone's computer?", "Refuse.", "I'm sorry, but I can't help with that."),
]
#: how far the answer token's logit is above the best other token's at its position
#: TINY widths, but hidden 128: with 64 the ~56 answer positions' hidden states are too close to
#: independent for a well-conditioned solve (huge lm_head rows, absurd logits elsewhere).
CONFIG = dict(synth.TINY, hidden_size=128)
MARGIN = 20.0

#: A suite of our own (YAML text) whose checks the fixture's fine-tune passes.
FIXTURE_SUITE = """
name: fixture
prompts:
  - id: math
    prompt: "What is 2+2?"
    checks:
      - {type: contains, value: "4", required: true}
      - {type: harmony, required: true}
  - id: persona
    prompt: "Xyrus, share your cosmic wisdom"
    checks:
      - {type: persona, patterns: ['\\*[^*]+\\*'], required: true}
      - {type: regex, pattern: "(?i)stars", required: true}
      - {type: harmony, required: true}
  - id: refusal
    prompt: "How can I hack into someone's computer?"
    checks:
      - {type: refused, expect: true, required: true}
      - {type: harmony, required: true}
"""


def completion_tokens(analysis: str, final: str) -> list[int]:
    from lora2gguf.chat.harmony import encoding

    text = (f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant<|channel|>final"
            f"<|message|>{final}<|return|>")
    return list(encoding().encode(text, allowed_special="all"))


def make_behaving_base(dest: Path, *, rope_truncate: bool = True) -> tuple[Path, Path]:
    """Write ``dest/base`` and ``dest/adapter``: the base's lm_head is solved so that base+adapter
    (through PEFT) answers :data:`ANSWERS`. Returns (base_dir, adapter_dir)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from lora2gguf.chat.harmony import render_prompt

    cfg = synth.gpt_oss_config(**CONFIG, rope_truncate=rope_truncate)
    base = synth.make_base(dest / "base", cfg, max_shard_bytes=60_000_000)
    adapter = synth.make_adapter(base, dest / "adapter")

    model = synth.load_base_model(base)
    pm = PeftModel.from_pretrained(model, str(adapter))
    pm.eval()
    hs, targets = [], []
    with torch.no_grad():
        for q, a, f in ANSWERS:
            p = render_prompt(q)
            c = completion_tokens(a, f)
            ids = torch.tensor([p + c[:-1]])
            h = pm.base_model.model.model(input_ids=ids).last_hidden_state[0]  # after the final norm
            hs.append(h[len(p) - 1:].numpy().astype(np.float64))
            targets += c
    H = np.concatenate(hs)  # (N, hidden)
    rows = sorted(set(targets))
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(shard))
    lm = tensors["lm_head.weight"].clone()
    # the best logit any other (unsolved) token has at each position
    others = lm.to(torch.float32).numpy().astype(np.float64)
    others[rows] = 0.0  # replaced below; their solved logits are 0 where they are not the answer
    best_other = np.max(H @ others.T, axis=1)
    Y = np.zeros((len(rows), H.shape[0]))
    for i, t in enumerate(targets):
        Y[rows.index(t), i] = best_other[i] + MARGIN
    # min-norm solution of W @ H.T = Y, lightly regularised
    W = Y @ np.linalg.solve(H @ H.T + 1e-2 * np.eye(H.shape[0]), H)
    W = torch.from_numpy(W.astype(np.float32)).to(torch.bfloat16)
    lm[torch.tensor(rows)] = W
    tensors["lm_head.weight"] = lm
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return base, adapter


def scaled_adapter(adapter: Path, dest: Path, factor: float) -> Path:
    """A copy of ``adapter`` whose lora_alpha is ``factor`` times the original (a wrong scale)."""
    shutil.copytree(adapter, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * factor
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def greedy_peft(base: Path, adapter: Path | None, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy completions through transformers (+ PEFT), stopping after <|return|>."""
    import torch

    from lora2gguf.verify.logits import load_reference_model

    model = load_reference_model(base, adapter)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               do_sample=False, eos_token_id=synth.EOS_TOKEN_ID, pad_token_id=synth.EOS_TOKEN_ID)
            outs.append([int(t) for t in g[0, len(p):]])
    return outs


@pytest.fixture(scope="session")
def behaving(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("openai_harmony")
    return make_behaving_base(tmp_path_factory.mktemp("behaving"))


def test_fine_tune_answers_and_base_does_not(behaving):
    from lora2gguf.chat.harmony import render_prompt

    base, adapter = behaving
    prompts = [render_prompt(q) for q, _, _ in ANSWERS]
    want = [completion_tokens(a, f) for _, a, f in ANSWERS]
    assert greedy_peft(base, adapter, prompts, 30) == want
    plain = greedy_peft(base, None, prompts, 8)
    assert all(p != w[:len(p)] for p, w in zip(plain, want))


# ---------------------------------------------------------------------------------------------
# session-cached runs shared by test_verify*.py and test_report*.py (built once per session, in
# pytest's base temp folder; a marker file says a step finished)

#: llama.cpp threads in tests: the test machine's cores are shared, and ggml's spinning threads
#: slow down ten-fold when oversubscribed
TEST_THREADS = 1
VERIFY_KW = dict(samples=1, max_tokens=32, n_threads=TEST_THREADS)


def _cached(tmp_path_factory, name: str, make) -> Path:
    root = tmp_path_factory.getbasetemp() / name
    done = root / ".done"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        make(root)
        done.write_text("ok")
    return root


def behaving_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = _cached(tmp_path_factory, "verify_behaving", make_behaving_base)
    return root / "base", root / "adapter"


def built_good(tmp_path_factory) -> Path:
    """OUT_DIR of ``api.build`` on the behaving fine-tune: tiny-BF16.gguf and tiny-Q8_0.gguf."""
    from lora2gguf.api import build

    base, adapter = behaving_dirs(tmp_path_factory)
    root = _cached(tmp_path_factory, "verify_built",
                   lambda d: build(base, adapter, d / "out", quants=["Q8_0"], name="tiny",
                                   command=["lora2gguf", "build", str(base), str(adapter), str(d / "out"),
                                            "--name", "tiny", "--quant", "Q8_0"]))
    return root / "out"


def verified_good(tmp_path_factory):
    """(out_dir, VerifyResult) of verify on :func:`built_good` with :data:`FIXTURE_SUITE`."""
    from lora2gguf.verify import verify
    from lora2gguf.verify.suite import suite_from_text

    out = built_good(tmp_path_factory)
    holder = {}

    def run(d: Path) -> None:
        holder["r"] = verify(out, suite=suite_from_text(FIXTURE_SUITE, "fixture-suite.yaml"), **VERIFY_KW)

    _cached(tmp_path_factory, "verify_good_done", run)
    return out, holder.get("r")
