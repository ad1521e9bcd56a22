"""Pretrain the demo's small Llama on the generated corpus, from scratch (a few CPU minutes).

No pretrained causal LM can be downloaded here, so the demo makes one: a byte-level BPE tokenizer
trained on the corpus and a ``LlamaForCausalLM`` built from a ``LlamaConfig``, trained with a
plain AdamW loop in fp32 (bf16 autocast is slower on this kind of CPU). The result is a stock
Hugging Face folder (config, safetensors, tokenizer) that every other ``offsite`` command accepts
like any downloaded model, plus ``pretrain.json`` recording the settings and the loss curve, which
:func:`is_pretrained` uses to reuse a finished run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from ...core.device import resolve_device
from ...core.progress import bar as progress_bar
from ...families import get_family, skipping_layers

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclasses.dataclass
class PretrainConfig:
    """Model shape and training schedule of the demo's base model."""

    layers: int = 8
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    vocab_size: int = 768
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.0
    outer_drop: float = 0.0
    """Probability of skipping each of the ``outer_layers`` first and last layers in a step."""
    outer_layers: int = 2
    seed: int = 0


def train_tokenizer(docs, vocab_size: int):
    """Byte-level BPE trained on ``docs``, wrapped as a ``PreTrainedTokenizerFast``.

    Byte level means any text (the quiz's ``Question:``/``Answer:`` too) can be encoded even though
    the corpus never contains it. A ``<s>`` is prepended on encoding, as Llama tokenizers do, so
    prompts at evaluation time start the way every pretraining document did.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(docs, trainer)
    bos = SPECIALS["bos_token"]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIALS)


def build_model(cfg: PretrainConfig, tokenizer):
    """A randomly initialised ``LlamaForCausalLM`` of the configured shape (untied head, as Llama-2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, max_position_embeddings=max(256, cfg.seq_len),
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def _blocks(docs, tokenizer, seq_len: int, rng: random.Random) -> torch.Tensor:
    """Documents in a fresh random order, packed into ``seq_len`` blocks (``<s> doc </s>`` each).

    Re-shuffling every epoch moves each fact to new positions and new neighbours, so the model
    cannot lean on where in a block a sentence sits.
    """
    order = list(range(len(docs)))
    rng.shuffle(order)
    stream = []
    for i in order:
        stream += docs[i] + [tokenizer.eos_token_id]
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_len)


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _skipped(cfg: PretrainConfig, rng: random.Random) -> list:
    """The outer layers to skip this step (LayerDrop restricted to the ends of the stack).

    Skipping the outer layers at random teaches the model to work without them, so it stores its
    facts in the middle layers, which is where an emulator loses them (and where large LMs keep
    factual recall: Meng et al., "Locating and Editing Factual Associations in GPT", 2022). A
    model that keeps facts in its first and last layers would hand them to the data owner in
    the adapter.
    """
    if cfg.outer_drop <= 0:
        return []
    ends = list(range(cfg.outer_layers)) + list(range(cfg.layers - cfg.outer_layers, cfg.layers))
    return [i for i in ends if rng.random() < cfg.outer_drop]


def pretrain(corpus_path, out, cfg: PretrainConfig | None = None, progress: bool = True, device="auto") -> Path:
    """Train tokenizer and model on ``corpus_path`` (one document per line) and save them to ``out``.

    Args:
        corpus_path: UTF-8 text file, one document per line.
        out: destination folder; gets ``config.json``, ``model.safetensors``, the tokenizer files
            and ``pretrain.json`` (written last, so its presence marks a finished run).
        cfg: model and schedule; defaults to :class:`PretrainConfig`.
        progress: show a tqdm bar.
        device: where the model trains (``"auto"``: CUDA when present; see :mod:`offsite.core.device`).

    Returns:
        The model folder.
    """
    cfg = cfg or PretrainConfig()
    where = resolve_device(device)
    out = Path(out)
    started = time.time()
    texts = Path(corpus_path).read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    docs = tokenizer(texts, add_special_tokens=True)["input_ids"]
    model = build_model(cfg, tokenizer).to(where)  # built on the CPU from the seed: the same start anywhere
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng, drop_rng = random.Random(cfg.seed), random.Random(f"drop-{cfg.seed}")
    family = get_family(model)
    batches, losses = [], []
    bar = progress_bar(range(cfg.steps), "pretrain", "step", enabled=progress, leave=False)
    for step in bar:
        if not batches:
            blocks = _blocks(docs, tokenizer, cfg.seq_len, rng)
            # one copy per epoch to the device; pop() from the end = in order
            batches = list(blocks.to(where).split(cfg.batch_size))[::-1]
        batch = batches.pop()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with skipping_layers(model, family, _skipped(cfg, drop_rng)):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"settings": dataclasses.asdict(cfg), "corpus_sha256": _sha256(corpus_path),
              "parameters": sum(p.numel() for p in model.parameters()),
              "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
              "loss_every_50": [round(x, 4) for x in losses[::50]], "seconds": round(time.time() - started, 1)}
    (out / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_pretrained(out, cfg: PretrainConfig, corpus_path) -> bool:
    """True when ``out`` holds a finished :func:`pretrain` run with these settings on this corpus."""
    record = Path(out) / "pretrain.json"
    if not record.is_file() or not (Path(out) / "model.safetensors").is_file():
        return False
    try:
        done = json.loads(record.read_text(encoding="utf-8"))
        return done["settings"] == dataclasses.asdict(cfg) and done["corpus_sha256"] == _sha256(corpus_path)
    except (ValueError, KeyError):
        return False
