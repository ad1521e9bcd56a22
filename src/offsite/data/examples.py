"""Fine-tuning examples: records -> (prompt, target) pairs -> token ids with masked labels -> batches.

The formats are those of :mod:`offsite.data.records.records`; ``mc`` records with a task name take the task's
own prompt (:mod:`offsite.data.records.tasks`), so fine-tuning and ``offsite eval`` see the same text.
"""

from __future__ import annotations

import json

import torch

from ..core.errors import OffsiteError
from .records import (FORMATS, IGNORE, JSONL_SUFFIXES, check_mc_record, check_prompt_record, mc_prompt, numbered_lines,
                      numbered_records)
from .tasks import get_task


def prompt_pairs(path, fmt: str, task: str | None = None) -> list:
    """``[(prompt, target), ...]`` for the ``prompt`` and ``mc`` formats.

    Raises:
        OffsiteError: a record is malformed (see :func:`check_mc_record`, :func:`check_prompt_record`),
            including an unlabeled mc record (label -1), which has no answer to train on.
    """
    rows = numbered_records(path)
    if task is not None:

        spec = get_task(task)
        return [spec.finetune_pair(r, where) for where, r in rows]
    if fmt == "prompt":
        return [(r["prompt"], r["completion"]) for r in (check_prompt_record(r, w) for w, r in rows)]
    pairs = []
    for where, r in rows:
        check_mc_record(r, where, allow_unlabeled=False)
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
    """Non-overlapping ``block_size`` blocks of the tokenised file (the remainder is dropped).

    Raises:
        OffsiteError: the file is JSONL (which would silently train on the JSON syntax), not UTF-8, or
            shorter than one block.
    """
    if str(path).endswith(JSONL_SUFFIXES):
        raise OffsiteError(_jsonl_as_text(path, "its name ends in .jsonl"))
    lines, first = [], None
    for lineno, line in numbered_lines(path):
        if first is None and line.strip():
            first = line
            try:
                is_record = isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                is_record = False
            if is_record:
                raise OffsiteError(_jsonl_as_text(path, f"line {lineno} is a JSON object"))
        lines.append(line)
    # Lines are decoded from bytes; turn \r\n and \r into \n as text-mode reading did before.
    text = "".join(lines).replace("\r\n", "\n").replace("\r", "\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    if not blocks:
        raise OffsiteError(f"{path} has {len(ids)} tokens, fewer than one block of {block_size}; "
                           "lower --block-size or add text")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _jsonl_as_text(path, why: str) -> str:
    return (f"{path} looks like JSONL ({why}), not plain text; for JSONL data use --format prompt "
            "(prompt/completion records) or --format mc (multiple-choice records)")


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
        raise OffsiteError(f"{path}: no usable examples (every completion is empty and the tokenizer has no EOS)")
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
