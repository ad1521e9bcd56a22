"""Fine-tuning data: plain text, prompt/completion JSONL, and the multiple-choice schema.

Formats (``--format``):

* ``text``: a UTF-8 text file (``.gz`` allowed) cut into causal-LM blocks of ``block_size`` tokens;
  loss on every token.
* ``prompt``: JSONL with ``{"prompt": ..., "completion": ...}`` per line; loss on the completion
  only (prompt tokens get label -100), EOS appended to the completion when the tokenizer has one.
* ``mc``: the multiple-choice schema of the shared data (``context``, ``question``, ``choices``,
  ``label``), turned into context -> gold answer as in Offsite-Tuning's recipe. With ``task`` set,
  the evaluation task spec builds the pairs (same prompts as ``offsite eval``); otherwise the
  generic prompt is ``"{context}\\nQuestion: {question}\\nAnswer:"`` + ``" {gold}"``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from .errors import OffsiteError

FORMATS = ("text", "prompt", "mc")
IGNORE = -100


def _open(path: Path):
    if not path.is_file():
        raise OffsiteError(f"data file {path} does not exist")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path) -> list:
    path = Path(path)
    rows = []
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise OffsiteError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
    if not rows:
        raise OffsiteError(f"{path} holds no records")
    return rows


def mc_prompt(record: dict) -> str:
    """Generic OT prompt for a multiple-choice record (context, then question, then 'Answer:')."""
    parts = [record.get("context") or ""]
    if record.get("question"):
        parts.append(f"Question: {record['question']}\nAnswer:")
    return "\n".join(p for p in parts if p)


def prompt_pairs(path, fmt: str, task: str | None = None) -> list:
    """``[(prompt, target), ...]`` for the ``prompt`` and ``mc`` formats."""
    rows = read_jsonl(path)
    if task is not None:
        from .eval.tasks import get_task

        spec = get_task(task)
        return [spec.finetune_pair(r) for r in rows if r.get("label", 0) >= 0]
    pairs = []
    for n, r in enumerate(rows, 1):
        if fmt == "prompt":
            if "prompt" not in r or "completion" not in r:
                raise OffsiteError(f"{path} record {n} lacks 'prompt'/'completion' (format 'prompt' needs both)")
            pairs.append((r["prompt"], r["completion"]))
        else:
            missing = [k for k in ("choices", "label") if k not in r]
            if missing:
                raise OffsiteError(f"{path} record {n} lacks {missing}; format 'mc' needs context, question, "
                                   "choices, label")
            if r["label"] < 0:
                continue  # unlabeled (hidden-label test split)
            pairs.append((mc_prompt(r), " " + r["choices"][r["label"]]))
    return pairs


def encode_pairs(pairs, tokenizer, block_size: int) -> list:
    """Token ids with labels masked on the prompt; left-truncated to ``block_size``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + eos
        ids, labels = (p + t)[-block_size:], ([IGNORE] * len(p) + t)[-block_size:]
        if any(x != IGNORE for x in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def text_blocks(path, tokenizer, block_size: int) -> list:
    """Non-overlapping ``block_size`` blocks of the tokenised file (the remainder is dropped)."""
    with _open(Path(path)) as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    if not blocks:
        raise OffsiteError(f"{path} has {len(ids)} tokens, fewer than one block of {block_size}; "
                           "lower --block-size or add text")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def load_examples(path, fmt: str, tokenizer, block_size: int, task: str | None = None) -> list:
    """Tokenised examples ``[{"input_ids": [...], "labels": [...]}]`` for any supported format."""
    if fmt not in FORMATS:
        raise OffsiteError(f"unknown data format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if tokenizer is None:
        raise OffsiteError("the emulator package has no tokenizer; rebuild it from a model folder that has one")
    if fmt == "text":
        return text_blocks(path, tokenizer, block_size)
    examples = encode_pairs(prompt_pairs(path, fmt, task), tokenizer, block_size)
    if not examples:
        raise OffsiteError(f"{path}: no usable examples (every target was truncated away or unlabeled)")
    return examples


def collate(examples: list, pad_id: int) -> dict:
    """Right-pad a batch. Returns ``input_ids``, ``attention_mask``, ``labels`` of shape ``(batch, seq)``."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
