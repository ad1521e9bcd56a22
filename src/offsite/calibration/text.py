"""Calibration text -> fixed-length token windows, the input of every calibrated emulator method.

Calibration data is *public* text held by the model owner, never the data owner's data. A file is
read whole (plain text, ``.gz`` allowed, or JSONL with a ``"text"`` field per line), tokenised
without special tokens, packed into contiguous non-overlapping windows of ``seq_len`` tokens, and
``num_sequences`` windows are drawn without replacement with a seeded generator, so the same file,
tokenizer and seed always give the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..core.errors import OffsiteError
from ..data.records import numbered_lines

# Public-domain text that none of the evaluation tasks or the report's fine-tuning data uses.
DEFAULT_CORPUS = "data/lm/war_and_peace/war_and_peace_pg2600.txt.gz"
_CHUNK_CHARS = 20_000  # tokenise in line-aligned chunks: avoids "sequence too long" warnings


@dataclasses.dataclass
class CalibrationConfig:
    """Where calibration windows come from and how many.

    Attributes:
        path: local public text file; None means :func:`default_calibration`.
        seq_len: tokens per window.
        num_sequences: windows drawn.
        batch_size: windows per batch.
        seed: seed of the window draw.
    """

    path: str | None = None
    seq_len: int = 128
    num_sequences: int = 64
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "num_sequences", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OffsiteError(f"calibration {name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise OffsiteError(f"calibration seq_len must be at least 2 (a next-token loss), got {self.seq_len}")


def default_calibration() -> Path | None:
    """The default public corpus (War and Peace, Project Gutenberg) in the shared data folder.

    Looks in ``$OFFSITE_SHARED``, then ``$OFFSITE_DATA_DIR/..``, then ``../shared`` next to the
    repository. Returns None when none of them holds it.
    """
    roots = [os.environ.get("OFFSITE_SHARED")]
    if os.environ.get("OFFSITE_DATA_DIR"):
        roots.append(str(Path(os.environ["OFFSITE_DATA_DIR"]).parent))
    roots.append(str(Path(__file__).resolve().parents[3].parent / "shared"))
    for root in filter(None, roots):
        candidate = Path(root).expanduser() / DEFAULT_CORPUS
        if candidate.is_file():
            return candidate
    return None


def resolve_calibration(path, method: str) -> Path:
    """The calibration file a method uses: ``path`` if given, else the default corpus.

    Raises:
        OffsiteError: no file given and no default found, naming the ``--calibration`` flag.
    """
    if path is not None:
        return Path(path)
    found = default_calibration()
    if found is None:
        raise OffsiteError(f"method '{method}' needs public calibration text: pass --calibration FILE "
                           f"(a .txt/.txt.gz/.jsonl file); the default {DEFAULT_CORPUS} was not found under "
                           "$OFFSITE_SHARED or ../shared")
    return found


def read_text(path) -> str:
    """The text of a plain (``.gz`` allowed) or JSONL (``"text"`` field) file."""
    path = Path(path)
    if not path.is_file():
        raise OffsiteError(f"calibration file {path} does not exist; pass a local public text file (--calibration)")
    # The data readers' line reader: bad bytes and fake .gz files are one error with the line.
    # Newlines are then normalised as text mode did, so the text (and every build) is unchanged.
    raw = "".join(line for _, line in numbered_lines(path)).replace("\r\n", "\n").replace("\r", "\n")
    if ".jsonl" in path.suffixes:
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OffsiteError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise OffsiteError(f"{path}:{n} has no string 'text' field (JSONL calibration needs one per line)")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise OffsiteError(f"calibration file {path} is empty; it needs public text to tokenise")
    return raw


def tokenize_text(text: str, tokenizer) -> list:
    """Token ids of ``text`` without special tokens, tokenised in line-aligned chunks."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= _CHUNK_CHARS:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    ids = []
    for encoded in tokenizer(chunks, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
    return ids


def calibration_batches(path, tokenizer, *, seq_len: int = 128, num_sequences: int = 64, batch_size: int = 8,
                        seed: int = 0) -> list:
    """Deterministic calibration batches from a public text file.

    Args:
        path: text file (``.txt``, ``.gz``) or JSONL with a ``"text"`` field.
        tokenizer: the model's tokenizer.
        seq_len: tokens per window.
        num_sequences: windows to draw (without replacement).
        batch_size: windows per batch; the last batch may be smaller.
        seed: seed of the draw.

    Returns:
        A list of ``torch.LongTensor`` of shape ``(batch, seq_len)``.

    Raises:
        OffsiteError: missing or empty file, no tokenizer, or too little text for the request.
    """
    cfg = CalibrationConfig(str(path), seq_len, num_sequences, batch_size, seed)
    if tokenizer is None:
        raise OffsiteError("calibration needs the model's tokenizer, but the model folder has none")
    ids = tokenize_text(read_text(path), tokenizer)
    windows = len(ids) // cfg.seq_len
    if windows < cfg.num_sequences:
        raise OffsiteError(f"calibration file {path} gives {len(ids)} tokens = {windows} window(s) of {cfg.seq_len}; "
                           f"{cfg.num_sequences} windows need {cfg.num_sequences * cfg.seq_len} tokens. Add text or "
                           "lower the number of sequences / the sequence length")
    table = torch.tensor(ids[:windows * cfg.seq_len], dtype=torch.long).view(windows, cfg.seq_len)
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.num_sequences]
    picked = table[order]
    return [picked[i:i + cfg.batch_size].clone() for i in range(0, cfg.num_sequences, cfg.batch_size)]
