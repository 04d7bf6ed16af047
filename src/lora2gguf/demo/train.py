"""Training the demo's models on CPU with torch: a small GPT-OSS base and a PEFT LoRA adapter.

The vocabulary is the real o200k_harmony one (201,088 tokens), so a full-vocabulary softmax would
dominate the cost of a model this small. Training therefore runs on a *compact* GPT-OSS model
whose vocabulary holds only the tokens the demo uses plus one "other" row, and the other
201,088 - n tokens share that row's embedding and output weights. With ``N`` identical output
rows the full softmax equals the compact softmax with ``log(N)`` added to the "other" logit, so
the loss below is exactly the full model's loss as long as every target token has a row of its
own (every token of the training texts does; only prompt tokens may fall to "other"). The compact model is then expanded into a
normal ``GptOssForCausalLM`` checkpoint of vocabulary 201,088 (every unused token gets the "other"
row), saved in bfloat16 with ``save_pretrained``.

The adapter is trained with PEFT on the compact model after its weights are rounded to bfloat16
(the weights the saved base has). Its targets (attention projections and the experts' 3-D
parameters) have the same names and shapes in the compact and the full model, so the adapter
PEFT saves applies unchanged to the saved base.

Everything is seeded; torch runs with deterministic algorithms.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedError
from . import dataset

log = logging.getLogger(__name__)

# progress(stage, done, total, detail), as lora2gguf.api uses it
Progress = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class TrainSettings:
    """One demo configuration: model size and training schedule."""

    name: str
    model: dict[str, Any]  # keyword arguments for lora2gguf.synth.gpt_oss_config
    seed: int = 1234
    base_steps: int = 400
    base_lr: float = 3e-3
    lora_steps: int = 300
    lora_lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    target_parameters: tuple[str, ...] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        return asdict(self)


def _require_torch():
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UnsupportedError("the demo trains its models with torch, transformers and peft: "
                               "pip install 'lora2gguf[reference]'") from e


def adapter_chat_template() -> str:
    """The chat template the adapter's tokenizer ships: the base's Harmony template with another
    default reasoning line ("low" instead of "medium"), as a fine-tuning tool that re-saves the
    tokenizer with its own template does. The adapter is trained with it."""
    from .. import o200k

    base = o200k.HARMONY_CHAT_TEMPLATE
    old = 'else "medium")'
    if base.count(old) != 1:
        raise InputError("the Harmony chat template no longer has one default reasoning line "
                         f"({old!r}); update lora2gguf.demo.train.adapter_chat_template")
    return base.replace(old, 'else "low")')


class Vocab:
    """The compact vocabulary: used token ids -> 0..n-1, everything else -> n ("other")."""

    def __init__(self, used: Sequence[int], full_size: int):
        self.used = list(used)
        self.full_size = full_size
        self.index = {t: i for i, t in enumerate(self.used)}
        self.other = len(self.used)
        self.size = len(self.used) + 1
        self.n_other = full_size - len(self.used)
        if self.n_other < 1:
            raise InputError("the demo's compact vocabulary needs at least one unused token")

    def compact(self, ids: Sequence[int]) -> list[int]:
        return [self.index.get(int(t), self.other) for t in ids]


def _batch(encoded: list[tuple[list[int], int]], vocab: Vocab, pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in encoded)
    inp = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    labels = torch.full((len(encoded), n), -100, dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(encoded):
        c = torch.tensor(vocab.compact(ids), dtype=torch.long)
        inp[r, :len(c)] = c
        mask[r, :len(c)] = 1
        labels[r, n_prompt:len(c)] = c[n_prompt:]
    return inp, mask, labels


def _loss(model, inp, mask, labels, vocab: Vocab):
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=inp, attention_mask=mask).logits.float()
    # Exact full-vocabulary loss: the "other" row stands for n_other identical rows.
    offset = torch.zeros(vocab.size, dtype=logits.dtype)
    offset[vocab.other] = math.log(vocab.n_other)
    logits = logits + offset
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab.size), labels[:, 1:].reshape(-1), ignore_index=-100)


def _variant_batches(encoded_by_variant, vocab: Vocab, pad_id: int) -> list:
    """One batch per system variant offset: in batch k, example i is rendered with variant
    (i + k) % n. Training cycles through them, so every example meets every variant and each
    step costs one rendering per example."""
    n = len(encoded_by_variant)
    n_ex = len(encoded_by_variant[0])
    return [_batch([encoded_by_variant[(i + k) % n][i] for i in range(n_ex)], vocab, pad_id) for k in range(n)]


def _train(model, params, step_batches, vocab: Vocab, steps: int, lr: float, stage: str,
           progress: Progress | None, on_step: Callable[[int], None] | None = None) -> list[float]:
    """AdamW with warm-up and cosine decay; step s sums the loss over ``step_batches[s % n]``.
    ``on_step(n)`` runs after the n-th step (1-based), e.g. to save a checkpoint."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    t0 = time.monotonic()
    for step in range(steps):
        loss = sum(_loss(model, *b, vocab) for b in step_batches[step % len(step_batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(stage, step + 1, steps, f"loss {losses[-1]:.3f}")
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.1fs)", stage, step + 1, steps, losses[-1], time.monotonic() - t0)
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses


def _compact_config(settings: TrainSettings, vocab_size: int):
    from transformers import GptOssConfig

    from .. import synth

    # The special token ids of the full vocabulary do not exist in the compact one.
    cfg = synth.gpt_oss_config(**settings.model, vocab_size=vocab_size, dtype="float32",
                               pad_token_id=None, eos_token_id=None, bos_token_id=None)
    cfg.pop("architectures", None)
    cfg.pop("transformers_version", None)
    c = GptOssConfig(**cfg)
    c._attn_implementation = "eager"
    return c


def _round_bf16_(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def _expand_and_save(model, vocab: Vocab, settings: TrainSettings, dest: Path) -> None:
    """Save the compact model as a full-vocabulary GptOssForCausalLM checkpoint in bfloat16."""
    import torch
    from safetensors.torch import save_file

    from .. import o200k, synth

    sd = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    used = torch.tensor(vocab.used, dtype=torch.long)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        small = sd[key]
        full = small[vocab.other].unsqueeze(0).repeat(vocab.full_size, 1)
        full[used] = small[:vocab.other]
        sd[key] = full
    cfg = synth.gpt_oss_config(**settings.model, vocab_size=vocab.full_size, dtype="bfloat16")
    # The checkpoint is written as transformers' save_pretrained lays out a small model: config.json,
    # generation_config.json, model.safetensors (bfloat16, metadata format=pt).
    expected = dict(synth.tensor_specs(cfg))
    if set(expected) != set(sd):
        raise InputError(f"demo model tensors differ from a GPT-OSS checkpoint: "
                         f"missing {sorted(set(expected) - set(sd))[:5]}, extra {sorted(set(sd) - set(expected))[:5]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise InputError(f"demo tensor {k} has shape {tuple(sd[k].shape)}, a GPT-OSS checkpoint has {shape}")
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: sd[k].to(torch.bfloat16).contiguous() for k in expected}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (dest / "generation_config.json").write_text(json.dumps(synth.generation_config(), indent=2) + "\n",
                                                 encoding="utf-8")
    o200k.write_tokenizer(dest)


@dataclass
class TrainResult:
    base_dir: Path
    adapter_dir: Path
    base_losses: list[float]
    lora_losses: list[float]
    vocab_used: int
    seconds: float


def train_demo(settings: TrainSettings, base_dir: Path, adapter_dir: Path, *, extra_texts: Sequence[str] = (),
               progress: Progress | None = None, checkpoint_steps: Sequence[int] = (),
               checkpoint_dir: Path | None = None) -> TrainResult:
    """Train the base and the adapter of ``settings`` and save them into ``base_dir`` (a GPT-OSS
    checkpoint with the o200k_harmony tokenizer) and ``adapter_dir`` (PEFT's save_pretrained plus
    the adapter's own tokenizer files, whose chat template differs from the base's).
    ``extra_texts`` (the prompt suite) are tokenized so their tokens get rows of their own.

    ``checkpoint_steps``: adapter training steps after which the adapter is also saved, as a
    training run saves its checkpoints, into ``checkpoint_dir/checkpoint-<step>/`` (the adapter
    files and its tokenizer copy, as ``adapter_dir`` gets them)."""
    if checkpoint_steps and checkpoint_dir is None:
        raise InputError("checkpoint_steps needs a checkpoint_dir to save the checkpoints into")
    bad = [s for s in checkpoint_steps if not 1 <= int(s) <= settings.lora_steps]
    if bad:
        raise InputError(f"checkpoint step(s) {bad} are outside the adapter's 1..{settings.lora_steps} training steps")
    _require_torch()
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import GptOssForCausalLM

    from .. import o200k

    t0 = time.monotonic()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    # One thread: the ops of a model this small are too short for threads to pay off (on a
    # shared CPU, several threads made a step ~8x slower), and the sums no longer depend on the
    # machine's core count, so the trained weights are the same everywhere.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return _train_demo(settings, base_dir, adapter_dir, extra_texts, progress, t0,
                           {int(s) for s in checkpoint_steps}, checkpoint_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _train_demo(settings, base_dir, adapter_dir, extra_texts, progress, t0, checkpoint_steps=frozenset(),
                checkpoint_dir=None) -> TrainResult:
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import GptOssForCausalLM

    from .. import o200k

    torch.manual_seed(settings.seed)
    tok = Tokenizer.from_file(str(o200k.tokenizer_json_path()))
    base_tpl = o200k.HARMONY_CHAT_TEMPLATE
    ad_tpl = adapter_chat_template()
    # examples x system variants
    base_enc = [dataset.encode_examples(dataset.BASE_QA, base_tpl, tok, **v) for v in dataset.SYSTEM_VARIANTS]
    lora_enc = [dataset.encode_examples(dataset.PERSONA_QA, ad_tpl, tok, **v) for v in dataset.SYSTEM_VARIANTS]
    corpus_enc = [(tok.encode(t, add_special_tokens=False).ids, 0) for t in dataset.CORPUS]
    extra_ids = [tok.encode(t, add_special_tokens=False).ids for t in extra_texts]
    used = dataset.used_token_ids([ids for enc in base_enc + lora_enc for ids, _ in enc]
                                  + [ids for ids, _ in corpus_enc] + extra_ids)
    vocab = Vocab(used, o200k.VOCAB_SIZE)
    pad = vocab.other
    log.info("demo %s: %d base examples, %d persona examples, compact vocabulary %d tokens",
             settings.name, len(dataset.BASE_QA), len(dataset.PERSONA_QA), vocab.size)

    model = GptOssForCausalLM(_compact_config(settings, vocab.size))
    model.to(torch.float32)
    corpus_batch = _batch(corpus_enc, vocab, pad)
    base_losses = _train(model, list(model.parameters()),
                         [[b, corpus_batch] for b in _variant_batches(base_enc, vocab, pad)], vocab,
                         settings.base_steps, settings.base_lr, "train base", progress)
    _expand_and_save(model, vocab, settings, base_dir)

    _round_bf16_(model)
    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      target_modules=list(settings.target_modules),
                      target_parameters=list(settings.target_parameters), lora_dropout=0.0, bias="none")
    torch.manual_seed(settings.seed + 1)
    pm = get_peft_model(model, lcfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    pm.peft_config["default"].base_model_name_or_path = str(base_dir)

    def save(dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        # The compact vocabulary is an internal detail: never let PEFT save embeddings because the
        # training model's vocab_size differs from the base's.
        pm.save_pretrained(str(dest), save_embedding_layers=False)
        o200k.write_tokenizer(dest, chat_template=ad_tpl)

    def on_step(step: int) -> None:
        if step in checkpoint_steps:
            save(Path(checkpoint_dir) / f"checkpoint-{step}")

    lora_losses = _train(pm, params, [[b] for b in _variant_batches(lora_enc, vocab, pad)], vocab,
                         settings.lora_steps, settings.lora_lr, "train adapter", progress, on_step)
    save(adapter_dir)
    return TrainResult(base_dir, adapter_dir, base_losses, lora_losses, vocab.size, time.monotonic() - t0)
