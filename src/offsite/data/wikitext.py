"""WikiText-2 raw documents from the offline data folder, split and detokenised as lm-eval does."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from ..core.errors import OffsiteError

_HEADING = re.compile(r"^ = [^=].* = $")  # top-level heading; " = = Sub = = " is a section


def split_wikitext_documents(text: str) -> list[str]:
    """Split raw WikiText into articles at top-level `` = Title = `` heading lines."""
    docs: list[list[str]] = []
    preamble: list[str] = []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")):
            docs.append(preamble + [line])
            preamble = []
        elif docs:
            docs[-1].append(line)
        else:
            preamble.append(line)  # text before the first heading joins the first article
    if preamble and "".join(preamble).strip():
        docs.append(preamble)  # a file with no heading at all is one document
    return ["".join(lines) for lines in docs]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (`` @-@ ``, spaces before punctuation, ...), lm-eval's rules."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for tokenised, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                             (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(tokenised, plain)
    # Brackets and quotes: drop the spaces just inside them.
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for tokenised, plain in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                             (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(tokenised, plain)
    return s


def wikitext_file(data_dir, split: str) -> Path:
    """Path of the raw WikiText-2 file for ``split`` (``validation``/``valid`` or ``test``)."""
    names = {"validation": "valid", "valid": "valid", "test": "test"}
    if split not in names:
        raise OffsiteError(f"wikitext has no {split!r} split here; allowed: validation, test "
                           "(the raw train file is not in the offline data)")
    path = Path(data_dir) / "lm" / "wikitext-2-raw" / f"wiki.{names[split]}.raw.gz"
    if not path.is_file():
        raise OffsiteError(f"wikitext data not found: tried {path}; point --data-dir (or OFFSITE_DATA_DIR) "
                           "at the folder that contains lm/wikitext-2-raw/")
    return path


def load_wikitext(data_dir, split: str = "validation", limit: int | None = None) -> list[str]:
    """The WikiText-2 raw documents of ``split`` (first ``limit`` of them when given)."""
    with gzip.open(wikitext_file(data_dir, split), "rt", encoding="utf-8") as fh:
        docs = split_wikitext_documents(fh.read())
    return docs[:limit] if limit is not None else docs
